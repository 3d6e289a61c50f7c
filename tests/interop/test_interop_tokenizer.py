"""The tokenizer of the Hugging Face export against fasttips' own (SentencePiece after str.lower(), no
BOS/EOS, pad 0, truncated to text.max_len): transformers' AutoTokenizer must give the same ids for
text outside the vocabulary, unicode, case, whitespace, digits, punctuation, long and empty text."""
import io
import json
import unicodedata

import pytest
import sentencepiece as spm
import torch
from interop_helpers import CAPTIONS, tiny_cfg, tiny_model

from fasttips.data.tokenizer import Tokenizer
from fasttips.interop import cli, formats

NATURAL = ["Le café où nous étions était fermé", "Tiếng Việt có dấu: người, được, phở", "한국어 문장입니다 강아지가",
           "Größenverhältnisse der Straße", "Ελληνικά: ΟΔΟΣ της Αθήνας", "Русский текст: Ёжик",
           "日本語のテキスト：東京タワーとｶﾀｶﾅ", "عربي: كِتَابٌ", "naïve coöperate façade résumé"]
STRINGS = [
    "", " ", "    ", "\t\n", "a", "A", "A Red Bus On A Street", "A RED BUS", "two  dogs   play ", "  leading",
    "trailing   ", "a junco on a branch", "jjj qqq zzz xyz", "jay, quokka & zebra!", "Ünïcödé café",
    "ΟΔΟΣ ΣΟΦΟΣ Σ. ΑΣ'Σ", "straße ẞ", "İstanbul", "emoji 😀🎉 👨‍👩‍👧 🇫🇷", "ﬁne ligatures ﬀ ﬃ", "℃ ㎏ ½ ① Ⅻ ǅ",
    "0123456789", "3.14 and 1,000,000 and 2024-01-02", "punctuation!? (a) [b] {c} <d> \"e\" 'f' ...;: — – …",
    "tab\there\nnew line\r\nend", "non\u00a0breaking\u2003em\u3000ideographic", "zero\u200bwidth\u200djoin",
    "ogham\u1680space", "▁marker ▁▁x", "<pad> <unk> </s>", "a" * 300,
    " ".join(["A Long Caption With Many Words About A Junco"] * 12), "MiXeD CaSe WoRdS",
] + [unicodedata.normalize(form, t) for t in NATURAL for form in ("NFC", "NFD")] + CAPTIONS


def sentencepiece(model_type: str, vocab: int = 64, **extra) -> Tokenizer:
    """A SentencePiece model with fasttips' conventions (pad 0, unk 1, no BOS/EOS) on the test captions:
    most letters of the alphabet and all non-ASCII text fall outside its vocabulary."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([c.lower() for c in CAPTIONS * 3]), model_writer=model, vocab_size=vocab,
        model_type=model_type, character_coverage=1.0, hard_vocab_limit=False, pad_id=0, unk_id=1, bos_id=-1,
        eos_id=-1, minloglevel=2, **extra)
    return Tokenizer.from_bytes(model.getvalue(), max_len=16)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg(text__vocab_size=320)
    return cfg, tiny_model(cfg).state_dict()


@pytest.mark.parametrize("kind", ["bpe", "unigram", "bpe-byte-fallback", "bpe-identity-normalisation"])
def test_auto_tokenizer_from_the_export_gives_fasttips_ids(tmp_path, tiny, kind):
    transformers = pytest.importorskip("transformers", minversion="5.14")
    extra = {"bpe-byte-fallback": dict(byte_fallback=True, vocab=300),
             "bpe-identity-normalisation": dict(normalization_rule_name="identity")}.get(kind, {})
    tok = sentencepiece(kind.split("-")[0], **extra)
    cfg, state = tiny
    formats.write_hf(tmp_path, state, cfg, tok.serialized())
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = STRINGS
    if kind == "unigram":          # documented: a Unigram lattice takes the literal "<pad>" as the piece
        texts = [t for t in texts if "<pad>" not in t and "<unk>" not in t]
    enc = hf(texts, padding="max_length", max_length=tok.max_len, truncation=True, return_tensors="pt")
    ids, pad = tok.encode(texts)
    differ = [t for t, a, b in zip(texts, enc["input_ids"], ids) if not torch.equal(a, b)]
    assert not differ, f"{len(differ)} of {len(texts)} strings differ, e.g. {differ[:3]}"
    assert torch.equal(enc["attention_mask"].bool(), ~pad)
    # unpadded calls: no BOS/EOS, nothing added
    for text in ("A junco", "", "x"):
        assert hf(text)["input_ids"] == tok.sp.encode(text.lower())


def test_the_export_tokenizer_config_names_the_fast_tokenizer(tmp_path, tiny):
    """Checked without transformers: the folder carries tokenizer.json and a config that makes
    AutoTokenizer read it as it is (not rebuild its own pipeline from tokenizer.model)."""
    cfg, state = tiny
    written = formats.write_hf(tmp_path, state, cfg, sentencepiece("bpe").serialized())
    assert tmp_path / "tokenizer.json" in written
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["split_special_tokens"] is True
    assert config["pad_token"] == "<pad>" and config["model_max_length"] == cfg.text.max_len
    content = json.loads((tmp_path / "tokenizer.json").read_text())
    assert content["model"]["type"] == "BPE" and content["model"]["unk_token"] == "<unk>"
    assert content["model"]["fuse_unk"] is True and content["model"]["byte_fallback"] is False
    assert content["model"]["vocab"]["<pad>"] == 0


def test_the_proto_reader_agrees_with_protobuf():
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    from fasttips.interop import hf_tokenizer
    proto = sentencepiece("bpe", byte_fallback=True, vocab=300, add_dummy_prefix=False).serialized()
    spec, ref = hf_tokenizer.read_spec(proto), pb2.ModelProto.FromString(proto)
    assert [(p, s, k) for p, s, k in spec.pieces] == [(p.piece, p.score, p.type) for p in ref.pieces]
    assert spec.model_type == "bpe" and spec.byte_fallback and not spec.add_dummy_prefix
    assert spec.charsmap == ref.normalizer_spec.precompiled_charsmap and spec.remove_extra_whitespaces


def test_a_tokenizer_the_json_cannot_reproduce_is_refused(tmp_path, capsys):
    """User-defined symbols are matched by SentencePiece before segmenting; say so, write nothing."""
    from interop_helpers import save_run
    cfg = tiny_cfg()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 3), model_writer=model, vocab_size=60, hard_vocab_limit=False,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, user_defined_symbols=["<photo>"], minloglevel=2)
    save_run(tmp_path / "run", cfg, tiny_model(cfg), Tokenizer.from_bytes(model.getvalue(), 16))
    assert cli.main(["export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 2
    assert "tokenizer.model: user-defined symbols" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

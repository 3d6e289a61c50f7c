"""SentencePiece tokenizer: train, encode conventions, serialize, load foreign models."""
import sentencepiece as spm
import pytest
import torch

from fasttips.data.tokenizer import Tokenizer

TEXTS = [f"A {c} {s} on a {t} background, number {i}." for i, (c, s, t) in enumerate(
    (c, s, t) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")
    for t in ("striped", "plain", "dotted"))] * 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    t = Tokenizer.train(TEXTS, vocab_size=120, path=path, max_len=12)
    assert path.is_file()
    return t


def test_encode_conventions(tok):
    ids, pad = tok.encode(["A Red Circle", "", "red " * 40])
    assert ids.dtype == torch.int64 and pad.dtype == torch.bool and ids.shape == pad.shape == (3, 12)
    assert (ids[pad] == 0).all() and (ids[~pad] > 0).all()       # pad id 0, no other id is 0
    assert pad[1].all()                                            # empty caption: all padding
    assert not pad[2].any()                                        # truncated to max_len
    lower, _ = tok.encode(["a red circle"])
    assert torch.equal(ids[0], lower[0])                           # lower-cased
    assert tok.decode(ids[0]) == "a red circle"                    # no BOS/EOS around it
    assert 1 < tok.vocab_size <= 120 and int(ids.max()) < tok.vocab_size


def test_serialized_round_trip(tok, tmp_path):
    again = Tokenizer.from_bytes(tok.serialized(), max_len=12)
    texts = ["a blue triangle on a dotted background", "number 7"]
    assert all(torch.equal(a, b) for a, b in zip(tok.encode(texts), again.encode(texts)))
    (tmp_path / "x.model").write_bytes(tok.serialized())
    loaded = Tokenizer.load(tmp_path / "x.model", max_len=12)
    assert torch.equal(loaded.encode(texts)[0], tok.encode(texts)[0])


def test_training_is_byte_reproducible(tok):
    """Ranks that train the tokenizer side by side (and a rerun) must get the very same model bytes:
    a resume compares them with the checkpoint's tokenizer.model."""
    assert Tokenizer.train(TEXTS, vocab_size=120, max_len=12).serialized() == tok.serialized()


def test_foreign_model_without_pad_is_shifted(tmp_path):
    """A model whose id 0 is <unk> (e.g. Llama-style) gets every id shifted so 0 stays padding."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(t.lower() for t in TEXTS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "f"), vocab_size=100,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    tok = Tokenizer.load(tmp_path / "f.model", max_len=8)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "f.model"))
    ids, pad = tok.encode(["a red circle"])
    raw = sp.encode("a red circle")
    assert tok.offset == 1 and tok.vocab_size == sp.get_piece_size() + 1
    assert ids[0, : len(raw)].tolist() == [r + 1 for r in raw] and (ids[pad] == 0).all()


def test_bad_input_is_named(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(TypeError, match="list"):
        tok.encode("a string")
    with pytest.raises(ValueError, match="no non-empty texts"):
        Tokenizer.train(["", "  "], vocab_size=50)

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


def _write_captioned_shards(folder, captions):
    """Two shards of tiny JPEGs whose alt-texts are ``captions`` (cycled), written in place."""
    import numpy as np

    from data_helpers import jpeg
    from fasttips.data.shards import ShardWriter
    rng = np.random.default_rng(0)
    with ShardWriter(folder, prefix="shard", samples_per_shard=6) as w:
        for i in range(12):
            text = captions[i % len(captions)]
            w.write(f"s{i:04d}", jpeg(rng), "jpg", {"alt": text, "short": text, "long": text})
    return w.paths


def test_cached_tokenizer_follows_the_shard_contents(tmp_path, monkeypatch):
    """The tokenizer trained from shard captions is cached per shard *content*: unchanged shards
    reuse it, a shard rewritten in place with other captions trains a new one."""
    from data_helpers import tiny_cfg
    from fasttips.data import loader
    from fasttips.data.shards import index_shards

    trainings = []
    real_train = Tokenizer.train.__func__

    def counting_train(cls, texts, *args, **kwargs):
        trainings.append(list(texts))
        return real_train(cls, texts, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "train", classmethod(counting_train))
    cfg = tiny_cfg(tmp_path)

    def resolve():
        return loader.resolve_tokenizer(cfg, index_shards(loader.resolve_shards(cfg)))

    _write_captioned_shards(tmp_path, ["a red circle on a plain background", "a blue square"])
    first = resolve()
    again = resolve()
    assert len(trainings) == 1 and again.serialized() == first.serialized()    # cache hit

    # Same paths, other captions (longer, so the tar size changes as well as its mtime).
    _write_captioned_shards(tmp_path, ["zebra giraffe elephant hippopotamus crocodile " * 8,
                                       "xylophone quartet violoncello harpsichord " * 8])
    rewritten = resolve()
    assert len(trainings) == 2 and any("zebra" in t for t in trainings[1])
    assert rewritten.serialized() != first.serialized()
    def pieces(tok, text):
        return int((~tok.encode([text])[1]).sum())
    assert pieces(rewritten, "zebra giraffe") < pieces(first, "zebra giraffe")   # trained on the new words
    assert resolve().serialized() == rewritten.serialized() and len(trainings) == 2


def test_a_caption_that_tokenizes_to_nothing_is_reported(tok, caplog, monkeypatch):
    from fasttips.data import tokenizer as tokenizer_mod
    monkeypatch.setattr(tokenizer_mod, "_empty_captions_seen", 0)
    with caplog.at_level("WARNING", logger="fasttips.data.tokenizer"):
        ids, pad = tok.encode(["a red circle", "   "])
    assert pad[1].all() and not pad[0].all()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "'   ' tokenizes to nothing" in messages[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="fasttips.data.tokenizer"):
        tok.encode([""] * 20)                      # a few reports per process, then one line, then quiet
    assert len(caplog.records) == tokenizer_mod.MAX_EMPTY_CAPTION_WARNINGS


def test_a_file_that_is_not_sentencepiece_is_one_line_naming_the_field(tmp_path, tiny_shards, capsys):
    """data.tokenizer pointing at some other file (a JSON vocabulary, a text file) stops the run with
    exit 2 and one line naming data.tokenizer, not a SentencePiece traceback."""
    from fasttips.train import main
    bad = tmp_path / "vocab.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*vocab\.json.*not a SentencePiece model"):
        Tokenizer.load(bad)
    code = main(["--no-progress", "data.source=shards", f"data.path={tiny_shards}", f"data.tokenizer={bad}",
                 "data.batch_size=4", "data.global_size=56", "data.local_size=28", "data.num_workers=0",
                 f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and "data.tokenizer=" in err and "not a SentencePiece model" in err, err

"""DOCCI long-description retrieval on a tiny fixture in the release's layout: the descriptions file
``docci_descriptions.jsonlines`` (example_id, split, image_file, description) and ``images/``."""
import json

import pytest

from fasttips.eval.suites import DatasetLayoutError, run_from_args
from fasttips.eval.suites.docci import read_descriptions
from suite_helpers import OracleModel, OracleTokenizer, colour, run_suite, save_image

SPLITS = ["train", "test", "qual_dev", "test", "train", "test", "qual_test", "test", "test"]
MAX_LEN = 16


def description(i, words):
    """'picture 3 shows ...': ``words`` words in all, the first two say which image."""
    return " ".join([f"picture {i}"] + [f"word{j}" for j in range(words - 2)])


def write_docci(root, lengths=(30, 8, 12, 40, 9, 17, 5, 16, 25)):
    """One image per line of SPLITS; image i has colour code i and a description of lengths[i] words.
    The 5 test images (1, 3, 5, 7, 8) have 8, 40, 17, 16, 25 words: 3 are longer than MAX_LEN."""
    lines = []
    for i, (split, n) in enumerate(zip(SPLITS, lengths)):
        name = f"{split}_{i:05d}"
        save_image(root / "images" / f"{name}.jpg", colour(i), size=(48, 36) if i % 2 else (36, 48))
        lines.append(json.dumps({"example_id": name, "split": split, "image_file": f"{name}.jpg",
                                 "description": description(i, n)}))
    (root / "docci_descriptions.jsonlines").write_text("\n".join(lines) + "\n")


class WordTokenizer(OracleTokenizer):
    """The oracle tokenizer (a description → the image it names, or ``confuse[image]``) that also counts
    one token per word."""
    max_len = MAX_LEN

    def __init__(self, confuse=None):
        confuse = confuse or {}
        super().__init__(lambda text: confuse.get(int(text.split()[1]), int(text.split()[1])))

    def n_tokens(self, texts):
        return [len(t.split()) for t in texts]


def test_oracle_retrieves_perfectly_and_truncation_is_counted(tmp_path):
    write_docci(tmp_path)
    res, log = run_suite(OracleModel(64), WordTokenizer(), None, "docci", tmp_path, tmp_path)
    assert res["n_images"] == 5 and res["n_captions"] == 5          # the test split only
    assert len(res["metrics"]) == 12 and all(v == 1.0 for v in res["metrics"].values()), res["metrics"]
    assert res["chance"]["CLS#2 image->text R@1"] == pytest.approx(1 / 5)
    assert res["chance"]["CLS#2 text->image R@5"] == 1.0
    assert res["text"]["max_len"] == MAX_LEN and res["text"]["n_truncated"] == 3
    assert res["text"]["max_tokens"] == 40
    assert res["notes"] == [f"3 of 5 descriptions were cut to their first {MAX_LEN} tokens"]
    assert "3 of 5 descriptions are longer than 16 tokens" in log
    assert "[docci] batch 3/3" in log and "[docci text] batch 1/1" in log


def test_a_confused_model_scores_zero_at_one(tmp_path):
    write_docci(tmp_path)
    test_images = [i for i, s in enumerate(SPLITS) if s == "test"]
    swap = dict(zip(test_images, test_images[1:] + test_images[:1]))   # each text names the next image
    res, _ = run_suite(OracleModel(64), WordTokenizer(swap), None, "docci", tmp_path, tmp_path)
    assert res["metrics"]["CLS#1 image->text R@1"] == 0.0 and res["metrics"]["CLS#1 text->image R@1"] == 0.0
    assert res["metrics"]["CLS#1 image->text R@5"] == 1.0


def test_tiny_model_through_the_cli_table_and_json(tmp_path, tiny, capsys):
    """The real tokenizer counts SentencePiece tokens; the numbers land in the one table and suites.json."""
    from test_runner import eval_parser
    model, tok, cfg = tiny
    root = tmp_path / "data"
    write_docci(root / "docci")
    args = eval_parser().parse_args(["RUN", "--suite", "docci", "--data-root", str(root), "--out",
                                     str(tmp_path / "out"), "--image-size", "28", "--workers", "0"])
    assert run_from_args(args, model, tok, cfg, default_out=tmp_path) == 0
    out = capsys.readouterr().out
    assert "docci  CLS#1 image->text R@1" in out and "docci  CLS#2 text->image R@10" in out
    saved = json.loads((tmp_path / "out" / "suites.json").read_text())["suites"]["docci"]
    texts = [d for _, d in read_descriptions(root / "docci")]
    counts = tok.n_tokens(texts)
    ids, pad = tok.encode(texts)
    assert [min(c, tok.max_len) for c in counts] == (~pad).sum(1).tolist()     # what encode keeps
    assert saved["text"]["n_truncated"] == sum(c > tok.max_len for c in counts) > 0
    assert saved["text"]["max_len"] == tok.max_len == cfg.text.max_len
    assert f"docci: {saved['text']['n_truncated']} of 5 descriptions were cut" in out


def test_layout_errors_name_the_missing_file(tmp_path, tiny):
    model, tok, cfg = tiny
    with pytest.raises(DatasetLayoutError,
                       match=f"^docci: missing file {tmp_path / 'docci_descriptions.jsonlines'} "):
        run_suite(model, tok, cfg, "docci", tmp_path, tmp_path)
    write_docci(tmp_path)
    (tmp_path / "images" / "test_00003.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=f"^docci: missing file {tmp_path / 'images' / 'test_00003.jpg'} "
                                                 r"\(named in docci_descriptions.jsonlines\)$"):
        run_suite(model, tok, cfg, "docci", tmp_path, tmp_path)
    with (tmp_path / "docci_descriptions.jsonlines").open("a") as f:
        f.write('{"example_id": "test_99999", "split": "test", "image_file": "test_99999.jpg"}\n')
    with pytest.raises(DatasetLayoutError, match=r"line 10: no 'description'"):
        run_suite(model, tok, cfg, "docci", tmp_path, tmp_path)

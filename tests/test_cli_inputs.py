"""`fasttips data` and `fasttips eval` with bad input: one line naming the line, key or option, the
right exit code, no traceback; `data check` lists what it skips and fails when nothing is usable."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from fasttips.data import cli as data_cli
from fasttips.data.shards import ShardWriter
from fasttips.eval import cli as eval_cli


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_pack_skips_lines_with_a_bad_image_field_or_bytes_and_names_the_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg(rng))
    lines = [json.dumps({"image": 5, "alt": "a number"}).encode(),           # 1: image is not a path
             json.dumps({"image": "a.jpg", "alt": "a photo"}).encode(),      # 2: good
             b'{"image": "a.jpg", "alt": "caf\xe9"}',                          # 3: Latin-1, not UTF-8
             json.dumps({"image": ["a.jpg"], "alt": "x"}).encode(),          # 4: a list
             b"",                                                            # blank: ignored
             json.dumps([1, 2]).encode()]                                    # 6: not an object
    (tmp_path / "caps.jsonl").write_bytes(b"\n".join(lines))
    code = data_cli.main(["pack", str(images), str(tmp_path / "caps.jsonl"), str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["written"] == 1 and counts["bad_line"] == 4
    for lineno in (1, 3, 4, 6):
        assert f"caps.jsonl:{lineno}: " in err, err
    assert "caps.jsonl:3: not UTF-8 text" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, words", [
    (["pack", "IMGS", "caps.jsonl", "out", "--samples-per-shard", "0"], "--samples-per-shard: must be >= 1"),
    (["tokenizer", "x", "--out", "t.model", "--vocab-size", "-5"], "--vocab-size: must be >= 1"),
    (["check", "x", "--max-listed", "-1"], "--max-listed: must be >= 0"),
])
def test_data_options_are_checked_by_argparse(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        data_cli.main(argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def _shards_with_problems(folder, rng, good: int):
    with ShardWriter(folder, samples_per_shard=10) as w:
        for i in range(good):
            w.write(f"good{i}", _jpeg(rng), "jpg", {"alt": f"photo {i}"})
        w.write("broken", b"\xff\xd8 not really a jpeg", "jpg", {"alt": "broken image"})
        w.write("silent", _jpeg(rng), "jpg", {"alt": "   "})            # no usable caption
    return folder


def test_check_lists_skipped_keys_with_reasons(tmp_path, capsys):
    folder = _shards_with_problems(tmp_path / "s", np.random.default_rng(1), good=2)
    assert data_cli.main(["check", str(folder)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["good_samples"] == 2 and summary["corrupt_image"] == 1 and summary["missing_caption"] == 1
    listed = "\n".join(lines[:-1])
    assert "'broken': corrupt_image" in listed and "'silent': missing_caption" in listed
    assert "good0" not in listed
    assert data_cli.main(["check", str(folder), "--max-listed", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len([x for x in lines if x.startswith("skipped ")]) == 1 and any("1 more skipped" in x for x in lines)
    assert any("data.caption_fields='alt=txt|json:caption'" in x for x in lines)   # how to map other shards


def test_check_fails_when_nothing_is_usable(tmp_path, capsys):
    folder = _shards_with_problems(tmp_path / "s", np.random.default_rng(2), good=0)
    (folder / "zz-truncated.tar").write_bytes(b"this is not a tar file at all" * 10)
    assert data_cli.main(["check", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["good_samples"] == 0
    assert "unreadable_shard" in out and "'broken': corrupt_image" in out
    assert err.strip() == "fasttips data check: no usable sample in 2 shard(s)"


def test_eval_rejects_missing_data_and_a_missing_gpu_before_loading(tmp_path, monkeypatch, capsys):
    import torch
    from fasttips.eval import loading
    monkeypatch.setattr(loading, "load_for_eval", lambda *a, **k: pytest.fail("loaded a model"))
    assert eval_cli.main([str(tmp_path), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fasttips eval: --data=") and "does not exist" in err and "\n" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_cli.main([str(tmp_path), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("fasttips eval: --device cuda, but torch sees no CUDA device; "
                                               "use --device cpu")
    with pytest.raises(SystemExit) as exit_:
        eval_cli.main([str(tmp_path), "--device", "tpu"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        eval_cli.main([str(tmp_path), "--n-images", "1"])
    assert "--n-images: must be >= 2" in capsys.readouterr().err


def test_tokenizer_without_captions_says_so_in_one_line(tmp_path, capsys):
    folder = _shards_with_problems(tmp_path / "s", np.random.default_rng(3), good=0)
    code = data_cli.main(["tokenizer", str(folder), "--out", str(tmp_path / "t.model")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no usable caption" in err and "\n" not in err

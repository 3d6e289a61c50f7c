"""Embedded demo data (scenes with class masks, skimage photos) and the ``fasttips data`` CLI."""
import builtins
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from fasttips.data import cli, demo, scenes
from fasttips.data.shards import MemberReader, index_shard, index_shards

from data_helpers import jpeg


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.ensure_demo_data(root)
    return root


def test_demo_layout_and_masks(demo_root):
    d = demo.ensure_demo_data(demo_root)                 # second call: cached
    meta = json.loads((d / "classes.json").read_text())
    assert meta["classes"] == list(scenes.CLASSES) and meta["mask_member"] == "mask.png"
    train, evals = demo.demo_shards(demo_root, "train"), demo.demo_shards(demo_root, "eval")
    train_keys = {s.key for ix in index_shards(train) for s in ix.samples}
    eval_ix = index_shards(evals)
    assert len(train_keys) == demo.N_TRAIN + meta["photos"]
    assert sum(len(ix.samples) for ix in eval_ix) == demo.N_EVAL
    reader = MemberReader()
    for s in eval_ix[0].samples[:20]:
        caps = reader.captions(s)
        assert {"alt", "short", "long"} <= set(caps) and s.key not in train_keys
        img = Image.open(io.BytesIO(reader.image(s)))
        mask = np.array(Image.open(io.BytesIO(reader.extra(s, "mask.png"))))
        assert mask.shape == (img.height, img.width) and mask.dtype == np.uint8
        objects = json.loads(reader.read(s.shard, *s.caption))["objects"]
        present = set(np.unique(mask).tolist()) - {0}
        assert present == {o["class_id"] for o in objects}
        for o in objects:                                   # the captions name every object
            assert f"{o['color']} {o['shape']}" in caps["alt"] and o["shape"] in caps["long"]


def test_eval_samples(demo_root):
    items = list(demo.eval_samples(demo_root, limit=5))
    assert len(items) == 5
    for it in items:
        assert it["mask"].shape == (it["image"].height, it["image"].width)
        assert it["classes"][0] == "background" and set(it["captions"]) == {"alt", "short", "long"}
        assert {o["class_id"] for o in it["objects"]} == set(np.unique(it["mask"]).tolist()) - {0}


def test_scene_is_a_pure_function_of_its_seed():
    a, b = scenes.make_scene(11), scenes.make_scene(11)
    assert a == b and scenes.make_scene(12)[0] != a[0]


def test_demo_photos_have_three_captions_and_credits():
    entries = demo.photo_entries()
    assert len(entries) >= 10
    for e in entries:
        assert all(e[k].strip() for k in ("alt", "short", "long", "licence", "credit"))
        assert len(e["long"]) > len(e["short"]) > len(e["alt"]) / 2


def test_demo_without_scikit_image(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name.startswith("skimage"):
            raise ImportError("no skimage")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    monkeypatch.setattr(demo, "N_TRAIN", 8)
    monkeypatch.setattr(demo, "N_EVAL", 4)
    d = demo.ensure_demo_data(tmp_path)
    assert "skipping the real-photo demo set" in capsys.readouterr().out
    assert json.loads((d / "classes.json").read_text())["photos"] == 0
    assert demo.demo_shards(tmp_path, "photos") == []


def test_cli_help_documents_every_option(capsys):
    for sub, options in {"pack": ["--samples-per-shard", "--prefix"],
                         "tokenizer": ["--out", "--vocab-size", "--max-captions", "--model-type"],
                         "demo": ["--root"], "check": []}.items():
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        text = capsys.readouterr().out
        assert all(o in text for o in options)


def test_cli_pack_tokenizer_check(tmp_path, capsys, seed):
    rng = np.random.default_rng(seed)
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    lines = []
    for i in range(5):
        name = f"sub/p{i}.jpg" if i % 2 else f"p{i}.png"
        if name.endswith(".png"):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / name)
        else:
            (images / name).write_bytes(jpeg(rng))
        lines.append(json.dumps({"image": name, "alt": f"photo {i}", "long": f"a long caption {i}"}))
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(images / "x.bmp")
    lines += [json.dumps({"image": "x.bmp", "short": "a bmp"}),              # converted to JPEG
              json.dumps({"image": "missing.jpg", "alt": "gone"}),           # missing image
              json.dumps({"image": "p0.png"}),                               # no caption
              "not json"]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines))
    out = tmp_path / "shards"
    assert cli.main(["pack", str(images), str(tmp_path / "caps.jsonl"), str(out), "--samples-per-shard", "4"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["written"] == 6 and counts["shards"] == 2
    assert counts["missing_image"] == counts["missing_caption"] == counts["bad_line"] == 1
    ix = index_shard(str(out / "shard-000000.tar"))
    assert [s.image[0] for s in ix.samples][:2] == ["png", "jpg"] and os.path.isfile(ix.dali_index)
    assert not any(p.name.endswith((".idx", ".json")) for p in out.iterdir())     # the index is in the cache
    assert cli.main(["tokenizer", str(out), "--out", str(tmp_path / "t.model"), "--vocab-size", "60"]) == 0
    assert (tmp_path / "t.model").is_file()
    assert cli.main(["check", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["good_samples"] == 6
    assert cli.main(["check", str(tmp_path / "nowhere")]) == 2


def test_the_long_demo_line_is_printed_only_when_the_demo_data_will_be_built(tmp_path, monkeypatch):
    from fasttips.config import load
    from fasttips.data.loader import startup_line
    monkeypatch.setenv("FASTTIPS_DATA_DIR", str(tmp_path / "cache"))
    cfg = load(overrides=[])                               # the default run: the demo data
    assert "builds it" in startup_line(cfg) and "30 s" in startup_line(cfg)
    (tmp_path / "cache" / demo.VERSION).mkdir(parents=True)
    (tmp_path / "cache" / demo.VERSION / "classes.json").write_text("{}")    # as a finished build leaves it
    line = startup_line(cfg)
    assert "builds" not in line and "30 s" not in line and str(tmp_path / "cache" / demo.VERSION) in line
    assert "data.path=/x" in startup_line(load(overrides=["data.path=/x"]))
    assert startup_line(load(overrides=["data.source=synthetic"])) is None

"""ImageNet zero-shot classification on tiny fixtures in both accepted on-disk layouts."""
import pytest

from fasttips.eval.suites import DatasetLayoutError
from fasttips.eval.suites.common import load_metadata
from fasttips.eval.zeroshot import class_prompts

from suite_helpers import OracleModel, OracleTokenizer, colour, run_suite, save_image

META = load_metadata("imagenet")
WNIDS = META["wnids"]


def prompt_lookup(names):
    table = {p: i for i, n in enumerate(names) for p in class_prompts([n], tuple(META["templates"]))}
    return lambda text: table[text]


def test_metadata_is_complete():
    assert len(WNIDS) == len(set(WNIDS)) == 1000 and WNIDS == sorted(WNIDS)
    assert len(META["classes"]) == 1000 and len(META["templates"]) == 80
    assert sorted(META["devkit_wnids"]) == WNIDS
    assert META["classes"][0] == "tench" and WNIDS[0] == "n01440764"


def test_image_folder_layout_oracle_is_perfect_and_a_confused_model_is_not(tmp_path):
    picked = [999, 3, 500]                            # ImageNet class indices, not in sorted order
    for c in picked:
        for j in range(2):
            save_image(tmp_path / "val" / WNIDS[c] / f"ILSVRC2012_val_{c:05d}{j}.JPEG", colour(c))
    tok = OracleTokenizer(prompt_lookup(META["classes"]))    # a prompt of class k → token k
    res, log = run_suite(OracleModel(1024), tok, None, "imagenet", tmp_path, tmp_path)
    assert res["n_images"] == 6 and res["n_classes"] == 1000 and res["n_classes_with_images"] == 3
    assert res["metrics"]["zero-shot CLS#1 top-1 acc"] == 1.0
    assert res["metrics"]["zero-shot CLS#2 top-1 acc"] == 1.0
    assert res["chance"]["zero-shot CLS#1 top-1 acc"] == pytest.approx(1 / 1000)
    assert "[imagenet] batch 3/3" in log
    bad, _ = run_suite(OracleModel(1024, shift=1), tok, None, "imagenet", tmp_path, tmp_path)
    assert bad["metrics"]["zero-shot CLS#1 top-1 acc"] == 0.0


def test_an_incomplete_val_folder_is_scored_1000_way(tmp_path):
    """Only 3 class folders: the 997 missing classes still compete. Images of class 3 that look like
    class 4 (no folder) are wrong; scored 3-way they would have been right by elimination."""
    from fasttips.eval.suites.report import table
    for c, looks_like in ((3, 4), (500, 500), (999, 999)):
        for j in range(2):
            save_image(tmp_path / "val" / WNIDS[c] / f"ILSVRC2012_val_{c:05d}{j}.JPEG", colour(looks_like))
    tok = OracleTokenizer(prompt_lookup(META["classes"]))
    res, log = run_suite(OracleModel(1024), tok, None, "imagenet", tmp_path, tmp_path)
    assert res["n_classes"] == 1000 and res["n_classes_with_images"] == 3
    assert res["metrics"]["zero-shot CLS#1 top-1 acc"] == pytest.approx(4 / 6)
    assert res["chance"]["zero-shot CLS#1 top-5 acc"] == pytest.approx(5 / 1000)
    assert "6 images of 3 classes, scored 1000-way" in log
    assert "imagenet: images of only 3 of the 1000 classes; scored 1000-way" in table({"imagenet": res})


def test_flat_layout_with_the_devkit_ground_truth(tmp_path):
    # the devkit numbers classes by ILSVRC2012_ID (1..1000), not by sorted wnid
    ids = [1, 2, 1000]
    for i, ilsvrc in enumerate(ids, start=1):
        c = WNIDS.index(META["devkit_wnids"][ilsvrc - 1])
        save_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", colour(c))
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, ids)) + "\n")
    tok = OracleTokenizer(prompt_lookup(META["classes"]))
    res, _ = run_suite(OracleModel(1024), tok, None, "imagenet", tmp_path, tmp_path, batch_size=4)
    assert res["n_images"] == 3 and res["n_classes"] == 1000
    assert res["metrics"]["zero-shot CLS#1 top-1 acc"] == 1.0
    assert res["chance"]["zero-shot CLS#1 top-5 acc"] == pytest.approx(0.005)


def test_flat_layout_with_a_two_column_labels_file(tmp_path):
    save_image(tmp_path / "val" / "a.JPEG", colour(7))
    save_image(tmp_path / "val" / "b.JPEG", colour(9))
    (tmp_path / "val_labels.txt").write_text(f"a.JPEG {WNIDS[7]}\nb.JPEG 9\n")
    tok = OracleTokenizer(prompt_lookup(META["classes"]))
    res, _ = run_suite(OracleModel(1024), tok, None, "imagenet", tmp_path, tmp_path)
    assert res["metrics"]["zero-shot CLS#2 top-1 acc"] == 1.0


def test_custom_class_folders_need_a_classnames_file(tmp_path, tiny):
    model, tok, cfg = tiny
    for c in ("cat", "dog"):
        save_image(tmp_path / "val" / c / "x.png", (10, 20, 30))
    with pytest.raises(DatasetLayoutError, match=f"missing file {tmp_path / 'classnames.txt'}"):
        run_suite(model, tok, cfg, "imagenet", tmp_path, tmp_path)
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    res, _ = run_suite(model, tok, cfg, "imagenet", tmp_path, tmp_path)
    assert res["n_classes"] == 2 and res["metrics"]["zero-shot CLS#1 top-2 acc"] == 1.0


def test_layout_errors_name_the_missing_path(tmp_path, tiny):
    model, tok, cfg = tiny
    with pytest.raises(DatasetLayoutError, match=f"imagenet: missing folder {tmp_path / 'val'}"):
        run_suite(model, tok, cfg, "imagenet", tmp_path, tmp_path)
    save_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", colour(1))
    with pytest.raises(DatasetLayoutError, match="missing file .*ILSVRC2012_validation_ground_truth.txt"):
        run_suite(model, tok, cfg, "imagenet", tmp_path, tmp_path)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    save_image(tmp_path / "val" / WNIDS[0] / "good.JPEG", colour(0))
    (tmp_path / "val" / WNIDS[1]).mkdir()
    (tmp_path / "val" / WNIDS[1] / "broken.JPEG").write_bytes(b"not a jpeg")
    tok = OracleTokenizer(prompt_lookup(META["classes"]))
    res, _ = run_suite(OracleModel(1024), tok, None, "imagenet", tmp_path, tmp_path)
    assert res["n_images"] == 1 and res["n_skipped"] == 1
    assert res["metrics"]["zero-shot CLS#1 top-1 acc"] == 1.0

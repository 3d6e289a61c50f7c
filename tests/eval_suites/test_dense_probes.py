"""Dense linear probes on tiny fixtures in the real public layouts: ADE20K / VOC segmentation,
NYUv2 depth (BTS layout) and surface normals (MTAN layout)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fasttips.eval.metrics import AngleStats, depth_errors, depth_eval_mask
from fasttips.eval.suites import DatasetLayoutError
from fasttips.eval.suites.dense import sample_grid, snapped_size
from fasttips.eval.suites.report import table
from suite_helpers import P, OracleModel, colour, run_suite, save_image

SEG = dict(probe_epochs=40, probe_lrs=(0.5,), probe_batch_size=4)
GEO = dict(probe_epochs=50, probe_lrs=(2.0,), probe_batch_size=1)


# -- fixtures in the public layouts ----------------------------------------------------------------
def scene(rng, n_classes, grid, first=1):
    """An image whose 14×14 patches are painted with the oracle code of their label value, and the
    label map: value v = k + first for k drawn from 0..n_classes-1, painted colour(v)."""
    values = rng.integers(0, n_classes, size=grid) + first
    label = np.kron(values, np.ones((P, P), dtype=np.int64)).astype(np.uint8)
    pixels = np.zeros(label.shape + (3,), np.uint8)
    for (r, c), v in np.ndenumerate(values):
        pixels[r * P:(r + 1) * P, c * P:(c + 1) * P] = colour(int(v))
    return pixels, label


def scenes(rng, n, n_classes, grid, first=1, labelled=lambda label: label):
    """``n`` scenes; for a training split, drawn again until every class shows in a labelled pixel (a
    class the probe never saw cannot be predicted, which made the accuracy checks fail for rare seeds)."""
    while True:
        drawn = [scene(rng, n_classes, grid, first) for _ in range(n)]
        seen = set().union(*(np.unique(labelled(label.copy())).tolist() for _, label in drawn))
        if grid != GRIDS["train"] or set(range(first, first + n_classes)) <= seen:
            return drawn


# Training images are 2×2 patches, so the training crop (the centre square) is the whole image and each
# patch token sees one label; validation images are 2×3 patches, scored with sliding windows.
GRIDS = {"train": (2, 2), "val": (2, 3)}


def write_ade_split(root, rng, split, n, n_classes=4):
    folder = {"train": "training", "val": "validation"}[split]
    (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)

    def unlabel_first_row(label):
        label[0, :] = 0
        return label
    for i, (pixels, label) in enumerate(scenes(rng, n, n_classes, GRIDS[split], labelled=unlabel_first_row)):
        label = unlabel_first_row(label)                             # an unlabelled row: ignored
        name = f"ADE_{split}_{i + 1:08d}"
        save_image(root / "images" / folder / f"{name}.jpg", pixels)
        Image.fromarray(label).save(root / "annotations" / folder / f"{name}.png")


def write_voc_splits(root, rng, n_train=4, n_val=2):
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "SegmentationClass").mkdir(parents=True)

    def void_border(label):
        label[:, -2:] = 255
        return label
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"2008_{split}{i:02d}" for i in range(n)]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, (pixels, label) in zip(ids, scenes(rng, n, 3, GRIDS[split], first=0, labelled=void_border)):
            label = void_border(label)                          # 0 = background, painted colour(0); the void border
            save_image(root / "JPEGImages" / f"{i}.jpg", pixels)
            png = Image.fromarray(label, mode="L").convert("P")
            png.putpalette([v for k in range(256) for v in (k, k, k)])
            png.save(root / "SegmentationClass" / f"{i}.png")


def depth_of(code):
    return 0.5 + 0.75 * code                                    # metres


def write_bts(root, n_train=6, n_test=3, codes=4):
    """BTS's NYUv2 folders: sync/<scene>/ for training, official_splits/test/<scene>/ for testing, and the
    two split files. Each 28×42 image shows one code everywhere; its depth map is that code's depth,
    with a few pixels of no depth (0)."""
    lines = {"train": [], "test": []}
    for split, n, base in (("train", n_train, root / "sync"), ("test", n_test, root / "official_splits" / "test")):
        for i in range(n):
            code = i % codes
            scene_dir = f"{'kitchen_0028b' if split == 'train' else 'bathroom'}"
            rgb, dep = f"{scene_dir}/rgb_{i:05d}.jpg", f"{scene_dir}/sync_depth_{i:05d}.png"
            save_image(base / rgb, colour(code), size=(42, 28))
            depth = np.full((28, 42), round(depth_of(code) * 1000), np.uint16)
            depth[0, :3] = 0
            Image.fromarray(depth).save(base / dep)
            lead = "/" if split == "train" else ""                       # as in BTS's two files
            lines[split].append(f"{lead}{rgb} {lead}{dep} 518.8579")
    lines["train"].append("/kitchen_0028b/rgb_09999.jpg None 518.8579")          # BTS skips these
    (root / "nyudepthv2_train_files_with_gt.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "nyudepthv2_test_files_with_gt.txt").write_text("\n".join(lines["test"]) + "\n")


NORMALS = [np.array(v, np.float32) / np.linalg.norm(v) for v in ([0, 0, 1], [1, 0, 1], [0, -1, 1], [-1, 1, 0.5])]


def write_mtan(root, n_train=6, n_test=3):
    """MTAN's NYUv2 folders: <split>/image/<i>.npy (float RGB in [0, 1]) and <split>/normal/<i>.npy (unit
    normals, zero = none) for split train and val; each 28×42 image shows one code, its normal that
    code's direction."""
    for split, n in (("train", n_train), ("val", n_test)):
        for sub in ("image", "normal", "depth", "label"):
            (root / split / sub).mkdir(parents=True)
        for i in range(n):
            code = i % len(NORMALS)
            img = np.empty((28, 42, 3), np.float32)
            img[:] = np.array(colour(code), np.float32) / 255.0
            normal = np.broadcast_to(NORMALS[code], (28, 42, 3)).copy()
            normal[-1, :5] = 0                                              # no ground truth there
            np.save(root / split / "image" / f"{i}.npy", img)
            np.save(root / split / "normal" / f"{i}.npy", normal)


# -- segmentation ------------------------------------------------------------------------------------
def test_ade20k_linear_probe_learns_the_oracle_and_not_the_blind_model(tmp_path, seed):
    rng = np.random.default_rng(seed)
    write_ade_split(tmp_path, rng, "train", 6)
    write_ade_split(tmp_path, rng, "val", 2)
    res, log = run_suite(OracleModel(256), None, None, "ade20k-linear", tmp_path, tmp_path, **SEG)
    assert res["n_classes"] == 150 and res["n_train"] == 6 and res["n_images"] == 2
    # bilinear upsampling may flip a few pixels where neighbouring patches meet
    assert res["metrics"]["pixel accuracy"] > 0.9 and res["metrics"]["mIoU"] > 0.8
    assert res["probe"]["lr"] == 0.5 and res["protocol"]["target_grid"] == 8
    assert "[ade20k-linear train] batch" in log and "[ade20k-linear] epoch 40/40" in log
    blind, _ = run_suite(OracleModel(256, blind=True), None, None, "ade20k-linear", tmp_path, tmp_path, **SEG)
    assert blind["metrics"]["mIoU"] < 0.4


def test_voc_linear_scores_background_as_a_class_and_ignores_void(tmp_path, seed):
    write_voc_splits(tmp_path, np.random.default_rng(seed))
    res, _ = run_suite(OracleModel(256), None, None, "voc-linear", tmp_path, tmp_path, **SEG)
    assert res["n_classes"] == 21 and "background" in res["iou_per_class"]
    assert res["iou_per_class"]["background"] is not None                 # background is scored here
    assert res["metrics"]["pixel accuracy"] > 0.9


def write_sbd(root, rng, ids, list_name):
    """SBD-augmented labels as the conversions write them: grayscale PNGs in SegmentationClassAug (a VOC
    training id's own label copied there too), and the list of ids."""
    (root / "SegmentationClassAug").mkdir(exist_ok=True)
    for i in ids:
        if not (root / "JPEGImages" / f"{i}.jpg").is_file():
            pixels, label = scene(rng, 3, GRIDS["train"], first=0)
            save_image(root / "JPEGImages" / f"{i}.jpg", pixels)
            Image.fromarray(label, mode="L").save(root / "SegmentationClassAug" / f"{i}.png")
        elif not (root / "SegmentationClassAug" / f"{i}.png").is_file():
            src = root / "SegmentationClass" / f"{i}.png"
            Image.fromarray(np.asarray(Image.open(src))).save(root / "SegmentationClassAug" / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / list_name).write_text("\n".join(ids) + "\n")


@pytest.mark.parametrize("layout", ["deeplab", "mmseg"])
def test_voc_linear_trains_on_the_sbd_augmented_set_when_it_is_there(tmp_path, seed, layout):
    """DeepLab's trainaug.txt (every label in SegmentationClassAug) or mmsegmentation's train.txt + aug.txt:
    the probe trains on the augmented set, never on a validation id, each image once."""
    rng = np.random.default_rng(seed)
    write_voc_splits(tmp_path, rng)                              # 4 train ids, 2 val ids
    sbd = [f"2011_sbd{i:02d}" for i in range(3)]
    val = (tmp_path / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    if layout == "deeplab":
        train = (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
        write_sbd(tmp_path, rng, train + sbd + val[:1] + sbd[:1], "trainaug.txt")   # a val id and a repeat
        expected_set = "trainaug.txt (SegmentationClassAug)"
    else:
        write_sbd(tmp_path, rng, sbd + val[:1], "aug.txt")
        expected_set = "train.txt + aug.txt (SegmentationClassAug)"
    res, log = run_suite(OracleModel(256), None, None, "voc-linear", tmp_path, tmp_path, **SEG)
    assert res["n_train"] == 4 + 3 and res["protocol"]["train_set"] == expected_set
    assert f"7 train ({expected_set})" in log
    assert res["metrics"]["pixel accuracy"] > 0.9


def test_voc_linear_refuses_augmented_labels_without_their_list(tmp_path, seed):
    write_voc_splits(tmp_path, np.random.default_rng(seed))
    (tmp_path / "SegmentationClassAug").mkdir()
    with pytest.raises(DatasetLayoutError, match="SegmentationClassAug is there but no list of its ids.*trainaug.txt"):
        run_suite(OracleModel(256), None, None, "voc-linear", tmp_path, tmp_path, **SEG)
    write_sbd(tmp_path, np.random.default_rng(seed), ["2011_sbd00"], "trainaug.txt")
    (tmp_path / "SegmentationClassAug" / "2011_sbd00.png").unlink()
    with pytest.raises(DatasetLayoutError, match="missing file .*2011_sbd00.png \\(listed in .*trainaug.txt\\)"):
        run_suite(OracleModel(256), None, None, "voc-linear", tmp_path, tmp_path, **SEG)


def test_segmentation_probe_layout_errors(tmp_path):
    rng = np.random.default_rng(0)
    write_ade_split(tmp_path, rng, "val", 1)
    with pytest.raises(DatasetLayoutError, match=f"ade20k-linear: missing folder {tmp_path / 'images' / 'training'}"):
        run_suite(OracleModel(256), None, None, "ade20k-linear", tmp_path, tmp_path)
    with pytest.raises(DatasetLayoutError, match="voc-linear: missing file .*ImageSets/Segmentation/train.txt"):
        run_suite(OracleModel(256), None, None, "voc-linear", tmp_path / "voc", tmp_path)


# -- depth ---------------------------------------------------------------------------------------------
def test_nyu_depth_probe_recovers_the_oracle_depth(tmp_path):
    write_bts(tmp_path)
    res, log = run_suite(OracleModel(16), None, None, "nyu-depth", tmp_path, tmp_path, **GEO)
    m, c = res["metrics"], res["chance"]
    assert res["n_train"] == 6 and res["n_images"] == 3 and res["protocol"]["input"] == [28, 42]
    assert m["RMSE"] < 0.05 and m["AbsRel"] < 0.03 and m["delta1 (<1.25)"] == 1.0
    assert c["RMSE"] > 0.5                                   # the mean training depth everywhere
    assert "[nyu-depth test] batch 3/3" in log
    blind, _ = run_suite(OracleModel(16, blind=True), None, None, "nyu-depth", tmp_path, tmp_path, **GEO)
    assert blind["metrics"]["RMSE"] > 0.8 * c["RMSE"]
    printed = table({"nyu-depth": res})
    assert "RMSE (lower is better)" in printed and " m " in printed + " "


def test_depth_metrics_and_the_eigen_crop():
    gt = torch.full((480, 640), 2.0)
    mask = depth_eval_mask(gt)
    assert mask.sum() == (471 - 45) * (601 - 41) and not mask[0, 0] and mask[45, 41]
    gt[100, 100] = 0.0
    gt[101, 100] = 10.0                                      # outside (0.001, 10): not scored
    assert depth_eval_mask(gt).sum() == (471 - 45) * (601 - 41) - 2
    assert depth_eval_mask(torch.full((28, 42), 2.0)).all()  # the crop is for 480×640 maps only
    errs = depth_errors(torch.tensor([1.0, 2.2, 4.0]), torch.tensor([1.0, 2.5, 2.0]), torch.ones(3, dtype=torch.bool))
    assert errs["rmse"] == pytest.approx(((0 + 0.09 + 4) / 3) ** 0.5)
    assert errs["abs_rel"] == pytest.approx((0 + 0.12 + 1.0) / 3)
    assert errs["delta1"] == pytest.approx(2 / 3)               # ratios 1, 1.14, 2


def test_nyu_depth_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="nyu-depth: missing file .*nyudepthv2_train_files_with_gt.txt"):
        run_suite(OracleModel(16), None, None, "nyu-depth", tmp_path, tmp_path)
    write_bts(tmp_path)
    (tmp_path / "official_splits" / "test" / "bathroom" / "sync_depth_00001.png").unlink()
    with pytest.raises(DatasetLayoutError, match="nyu-depth: missing file .*bathroom/sync_depth_00001.png"):
        run_suite(OracleModel(16), None, None, "nyu-depth", tmp_path, tmp_path)


# -- surface normals -----------------------------------------------------------------------------------
def test_nyu_normals_probe_recovers_the_oracle_normals(tmp_path):
    write_mtan(tmp_path)
    res, log = run_suite(OracleModel(16), None, None, "nyu-normals", tmp_path, tmp_path, **GEO)
    m, c = res["metrics"], res["chance"]
    assert res["n_train"] == 6 and res["n_images"] == 3
    assert m["mean angular error"] < 3.0 and m["median angular error"] < 3.0 and m["within 11.25 deg"] > 0.97
    assert c["mean angular error"] > 20.0
    assert res["units"]["angular RMSE"] == "deg"
    blind, _ = run_suite(OracleModel(16, blind=True), None, None, "nyu-normals", tmp_path, tmp_path, **GEO)
    assert blind["metrics"]["mean angular error"] > 15.0
    with pytest.raises(DatasetLayoutError, match="nyu-normals: missing folder .*nothing/train/image"):
        run_suite(OracleModel(16), None, None, "nyu-normals", tmp_path / "nothing", tmp_path)
    (tmp_path / "val" / "normal" / "1.npy").unlink()
    with pytest.raises(DatasetLayoutError, match="nyu-normals: missing file .*val/normal/1.npy"):
        run_suite(OracleModel(16), None, None, "nyu-normals", tmp_path, tmp_path)


def test_angle_stats_pool_pixels():
    stats = AngleStats()
    stats.add(torch.tensor([5.0, 10.0]))
    stats.add(torch.tensor([20.0, 40.0, 100.0]))
    r = stats.result()
    assert r["mean"] == pytest.approx(35.0) and r["median"] == pytest.approx(20.0, abs=0.01)
    assert r["rmse"] == pytest.approx(((25 + 100 + 400 + 1600 + 10000) / 5) ** 0.5)
    assert (r["within 11.25"], r["within 22.5"], r["within 30"]) == (0.4, 0.6, 0.6)


# -- shared pieces ------------------------------------------------------------------------------------
def test_grid_sampling_and_snapped_sizes():
    a = np.arange(8 * 12).reshape(8, 12)
    s = sample_grid(a, 4, 3)                      # cell centres at rows 1,3,5,7 and columns 2,6,10
    assert s.tolist() == [[a[r, c] for c in (2, 6, 10)] for r in (1, 3, 5, 7)]
    assert snapped_size(480, 640, 448, 14) == (448, 602)
    assert snapped_size(288, 384, 28, P) == (28, 42)


def test_tiny_model_runs_a_dense_probe_end_to_end(tmp_path, tiny):
    model, tok, cfg = tiny
    write_bts(tmp_path / "nyu")
    res, _ = run_suite(model, tok, cfg, "nyu-depth", tmp_path / "nyu", tmp_path, probe_epochs=2,
                       probe_lrs=(1e-3, 1e-2), probe_cache=str(tmp_path / "cache"))
    assert np.isfinite(res["metrics"]["RMSE"]) and res["probe"]["lr"] in (1e-3, 1e-2)
    assert not list((tmp_path / "cache").rglob("*.npy"))              # the memory-mapped cache is removed


def test_probe_options_through_the_command_line(tmp_path, capsys):
    """``fasttips eval --suite nyu-normals,voc-linear --probe-epochs ... --probe-lrs ...``: one table with
    units and fractions, suites.json with each probe's record; bad probe options are one line, exit 2."""
    import json

    from fasttips.eval.suites import run_from_args
    from test_runner import eval_parser
    root = tmp_path / "data"
    write_mtan(root / "nyuv2")
    write_voc_splits(root / "VOCdevkit" / "VOC2012", np.random.default_rng(0))
    out = tmp_path / "out"
    common = ["RUN", "--data-root", str(root), "--out", str(out), "--seg-size", "28", "--seg-stride", "14",
              "--workers", "0", "--batch-size", "2"]
    args = eval_parser().parse_args([*common, "--suite", "nyu-normals,voc-linear", "--probe-epochs", "3",
                                     "--probe-lrs", "0.1,1", "--probe-batch-size", "2"])
    assert run_from_args(args, OracleModel(16), None, None, default_out=tmp_path) == 0
    printed = capsys.readouterr()
    assert "nyu-normals  mean angular error (lower is better)" in printed.out and " deg" in printed.out
    assert "voc-linear   mIoU" in printed.out
    assert "[nyu-normals] epoch 3/3" in printed.err
    saved = json.loads((out / "suites.json").read_text())
    assert saved["settings"]["probe"] == {"epochs": 3, "lrs": [0.1, 1.0], "batch_size": 2, "cache": None}
    assert saved["suites"]["voc-linear"]["probe"]["lrs"] == [0.1, 1.0]
    assert set(saved["suites"]["nyu-normals"]["probe"]["selection_error"]) == {"0.1", "1"}
    for bad, message in ((["--probe-lrs", "0,1"], "--probe-lrs: expected positive learning rates, got (0.0, 1.0)"),
                         (["--probe-epochs", "0"], "--probe-epochs: must be >= 1, got 0")):
        args = eval_parser().parse_args([*common, "--suite", "nyu-normals", *bad])
        assert run_from_args(args, OracleModel(16), None, None, default_out=tmp_path) == 2
        assert capsys.readouterr().err.strip() == f"fasttips eval: {message}"


@pytest.mark.gpu
@pytest.mark.parametrize("suite", ["linear", "voc-linear", "nyu-depth", "nyu-normals"])
def test_probes_on_cuda_match_the_cpu(tmp_path, suite):
    """Every probe suite on a GPU (features, layer, upsampling and metrics on the device): the oracle's
    numbers as on the CPU."""
    from test_linear_probe import write_pair
    writers = {"linear": write_pair, "voc-linear": lambda r: write_voc_splits(r, np.random.default_rng(0)),
               "nyu-depth": write_bts, "nyu-normals": write_mtan}
    writers[suite](tmp_path / "d")
    opts = {"linear": dict(probe_epochs=30, probe_lrs=(0.5,), probe_batch_size=8), "voc-linear": SEG}.get(suite, GEO)
    res = {}
    for device in ("cpu", "cuda"):
        model = OracleModel(256 if suite == "voc-linear" else 16).to(device)
        res[device], _ = run_suite(model, None, None, suite, tmp_path / "d", tmp_path / device, device=device, **opts)
    for name, value in res["cpu"]["metrics"].items():
        assert res["cuda"]["metrics"][name] == pytest.approx(value, rel=1e-2, abs=1e-2), name


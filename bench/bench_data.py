"""Data loader throughput: images/s of each loader for DINO-style multi-crop recipes.

    python bench/bench_data.py [--quick] [--workers N] [--batch B] [--dali-ops]

The images are 200 JPEGs (quality 90, 400–640 px wide) cut and rescaled from scikit-image's sample
photos, in 4 shards written to a temp folder. Recipes: 1×224 + 8×98 (the TIPSv2 default) and
2×224 + 8×98 (DINOv2's two globals), full augmentation and iBOT masks, captions tokenized. Loaders:
``pytorch-pil`` (DataLoader + Pillow, N worker processes) and ``dali-cpu`` (the DALI graph with N
threads, no GPU) or ``dali-gpu`` (nvJPEG ``mixed`` decoding and GPU augmentation) when CUDA is there.
Timing is a throughput window (``measure``): whole batches from the running loader for a fixed
time after warm-up, ``ms`` = mean per batch, ``images_per_s`` = batch / ms. The baseline for ``×base`` is ``pytorch-pil``.

The CPU machine is shared, so wall-clock throughput depends on what else runs. Each row therefore
also records ``cpu_ms_per_image``: CPU time of this process and all its worker processes (from
/proc, Linux) per image over the timed window, and ``load_avg`` at the start; ``2000 /
cpu_ms_per_image`` is the throughput two otherwise idle cores would give.

``--dali-ops`` (DALI on the CPU only) times single DALI operators on 294² crops of the same JPEGs, with
one argument value for the whole batch against a per-sample random one (``dali-op-const`` /
``dali-op-per-sample``, CPU-ms per image per op). It is the measurement behind ``photometric.py``:
the DALI loader does jitter and blur in torch because the per-sample form is several times slower.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from harness import Bench  # noqa: E402

BASELINE = "pytorch-pil"
N_IMAGES, N_SHARDS = 200, 4
RECIPES = [(1, 224, 8, 98), (2, 224, 8, 98)]


def make_jpeg_shards(folder: str, n: int = N_IMAGES) -> str:
    """Shards of real-photo JPEGs: random crops of the skimage photos rescaled to 400–640 px wide."""
    import skimage.data

    from fasttips.data.demo import photo_entries
    from fasttips.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    photos = []
    for e in photo_entries():
        a = getattr(skimage.data, e["loader"].rsplit(".", 1)[-1])()
        a = a.astype(np.uint8) * 255 if a.dtype == bool else a
        photos.append((Image.fromarray(a).convert("RGB"), {k: e[k] for k in ("alt", "short", "long")}))
    with ShardWriter(folder, prefix="bench", samples_per_shard=-(-n // N_SHARDS)) as w:
        for i in range(n):
            img, caps = photos[i % len(photos)]
            cw, ch = int(img.width * rng.uniform(0.6, 1.0)), int(img.height * rng.uniform(0.6, 1.0))
            x, y = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
            width = int(rng.integers(400, 641))
            out = img.crop((x, y, x + cw, y + ch)).resize((width, max(1, round(width * ch / cw))), Image.BICUBIC)
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=90)
            w.write(f"img{i:05d}", buf.getvalue(), "jpg", caps)
    return folder


def tree_cpu_seconds(pid: int | None = None) -> float:
    """user + system CPU seconds of a process and all its descendants (Linux /proc; 0 elsewhere)."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                total += sum(tree_cpu_seconds(int(c)) for c in f.read().split())
        return total
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(fn, batch: int, seconds: float) -> tuple[dict, float, float]:
    """Throughput timing of a prefetching loader: ``ms`` is the MEAN time per batch over a window of
    whole batches (a median would be wrong: batches arrive in bursts when workers run ahead), with
    p20/p80 of the single-batch times; plus CPU-ms per image of the process tree and the load average."""
    load_avg = os.getloadavg()[0]
    cpu0, start = tree_cpu_seconds(), time.perf_counter()
    samples = []
    while not samples or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - start
    cpu_ms = 1e3 * (tree_cpu_seconds() - cpu0) / (len(samples) * batch)
    ordered = sorted(samples)
    timing = {"ms": 1e3 * wall / len(samples), "p20": ordered[int(0.2 * (len(ordered) - 1))],
              "p80": ordered[int(0.8 * (len(ordered) - 1))], "n": len(samples)}
    return timing, cpu_ms, load_avg


def loader_kinds() -> list[str]:
    from fasttips.data.loader import dali_available
    return ["pytorch"] + (["dali"] if dali_available() else [])


def run(quick: bool, workers: int = 2, batch: int = 32, results_dir: str | None = None) -> Bench:
    from fasttips.config import load
    from fasttips.data.loader import build_loader

    bench = Bench("data", quick=quick, device="cpu", measure_device_ceilings=False, results_dir=results_dir)
    gpu = torch.cuda.is_available()
    # quick without CUDA: a smoke pass of the bench itself (few images, small batches, a short
    # window); the loaders' real throughput needs the full run on an otherwise idle machine
    cpu_quick = quick and not gpu
    if cpu_quick:
        batch = min(batch, 8)
    n_images = 32 if cpu_quick else 96 if quick else N_IMAGES
    window_s = 1.5 if cpu_quick else 4 if quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FASTTIPS_DATA_DIR", os.path.join(tmp, "cache"))
        shards = make_jpeg_shards(os.path.join(tmp, "shards"), n_images)
        recipes = RECIPES[:1] if quick else RECIPES
        for n_global, gsize, n_local, lsize in recipes:
            case = {"recipe": f"{n_global}x{gsize}+{n_local}x{lsize}", "batch": batch, "workers": workers}
            for kind in loader_kinds():
                cfg = load(overrides=[
                    "preset=vit-s", "data.source=shards", f"data.path={shards}", f"data.loader={kind}",
                    f"data.batch_size={batch}", f"data.num_workers={workers}", f"data.n_global={n_global}",
                    f"data.global_size={gsize}", f"data.n_local={n_local}", f"data.local_size={lsize}",
                    "text.vocab_size=1000"])
                loader = build_loader(cfg)
                impl = "pytorch-pil" if kind == "pytorch" else ("dali-gpu" if gpu else "dali-cpu")
                def fn(loader=loader, sync=kind == "dali" and gpu):
                    batch_ = next(loader)
                    if sync:
                        torch.cuda.synchronize()
                    return batch_
                for _ in range(2):                     # start workers / build the DALI graph
                    fn()
                timing, cpu_ms, load_avg = measure(fn, batch, seconds=window_s)
                bench.add(case=case, impl=impl, timing=timing, images_per_s=batch / (timing["ms"] / 1e3),
                          cpu_ms_per_image=cpu_ms, load_avg=load_avg, cpu_count=os.cpu_count())
                if hasattr(loader, "close"):
                    loader.close()
                del loader
    return bench


def dali_op_costs(shards: str, bench: Bench, batch: int = 32, threads: int = 2, reps: int = 4,
                  size: int = 294, seconds: float = 6.0) -> None:
    """CPU-ms per image of one DALI op applied ``reps`` times to a resized crop, minus the same graph
    without the op, with a constant argument and with a per-sample random one."""
    import glob

    from nvidia.dali import fn, pipeline_def, types

    paths = sorted(glob.glob(os.path.join(shards, "*.tar")))

    def ops(kind):
        rand = kind == "per-sample"
        def value(lo, hi, const):
            return fn.random.uniform(range=[lo, hi]) if rand else const
        return {
            "none": lambda x: x,
            "gaussian_blur": lambda x: fn.gaussian_blur(x, window_size=9, sigma=value(0.1, 2.0, 1.0)),
            "color_twist": lambda x: fn.color_twist(x, brightness=value(0.6, 1.4, 1.1),
                                                    contrast=value(0.6, 1.4, 0.9),
                                                    saturation=value(0.8, 1.2, 1.1), hue=value(-36.0, 36.0, 10.0)),
        }

    def cpu_ms(op):
        @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=0, prefetch_queue_depth=2)
        def graph():
            encoded, _ = fn.readers.webdataset(paths=paths, ext=["jpg", "json"], name="Reader")
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            crop = fn.resize(image, size=[size, size], antialias=False, interp_type=types.INTERP_LINEAR)
            return tuple(op(crop) for _ in range(reps))
        pipe = graph()
        pipe.build()
        for _ in range(2):
            pipe.run()
        timing, cpu, load_avg = measure(pipe.run, batch, seconds)
        return timing, cpu, load_avg

    for kind in ("const", "per-sample"):
        table = ops(kind)
        _, base, _ = cpu_ms(table["none"])
        for name in ("gaussian_blur", "color_twist"):
            timing, cpu, load_avg = cpu_ms(table[name])
            bench.add(case={"op": name, "crop": size, "batch": batch, "threads": threads},
                      impl=f"dali-op-{kind}", timing=timing, cpu_ms_per_image_per_op=(cpu - base) / reps,
                      load_avg=load_avg, cpu_count=os.cpu_count())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one recipe, fewer images, short timing windows")
    p.add_argument("--workers", type=int, default=2, help="PyTorch worker processes / DALI threads (default 2)")
    p.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--dali-ops", action="store_true",
                   help="instead: DALI CPU op cost with constant vs per-sample arguments (needs DALI)")
    args = p.parse_args(argv)
    if args.dali_ops:
        bench = Bench("data", quick=args.quick, device="cpu", measure_device_ceilings=False)
        with tempfile.TemporaryDirectory() as tmp:
            dali_op_costs(make_jpeg_shards(tmp, 64 if args.quick else N_IMAGES), bench,
                          seconds=2.0 if args.quick else 6.0)
        bench.report()
        for row in bench.rows:
            print(f"  {row['impl']:<20} {row['case']['op']:<14} {row['cpu_ms_per_image_per_op']:6.2f} "
                  f"CPU-ms per image per op on {row['case']['crop']}² crops")
        print("results:", bench.write())
        return
    bench = run(args.quick, args.workers, args.batch)
    bench.report(baseline=BASELINE)
    for row in bench.rows:
        print(f"  {row['impl']:<12} {row['case']['recipe']:<14} {row['images_per_s']:7.1f} images/s   "
              f"{row['cpu_ms_per_image']:6.2f} CPU-ms/image (load avg {row['load_avg']:.1f})")
    print("results:", bench.write())


if __name__ == "__main__":
    main()

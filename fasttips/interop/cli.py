"""``fasttips export`` and ``fasttips import``.

    fasttips export SRC --to hf|timm|tips OUT [--weights student|teacher] [key=value ...]
    fasttips import SRC OUT [key=value ...]

SRC is a fasttips run dir or step_* checkpoint, a Hugging Face tipsv2 folder, a TIPS npz pair or a
timm file (timm: vision only). ``export`` writes the safe, shareable formats: ``hf`` a folder that
``transformers.AutoModel.from_pretrained(OUT)`` loads, ``timm`` a safetensors state dict for the
matching ``vit_*_patch14_reg1_tipsv2`` model, ``tips`` the release's two npz files. ``import`` turns
a release into a fasttips run dir (OUT/checkpoints/step_00000000) for ``fasttips eval``.

What the files do not record is given as key=value: a TIPS npz pair or a bare timm file of a width
that is not a released size needs ``vision.heads=N`` (fused qkv weights do not determine it).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

from . import formats
from .formats import Imported, SourceError, read_source
from .layout import LayoutError

_PRESET_BY_WIDTH = {384: "vit-s", 768: "vit-b", 1024: "vit-l", 1152: "so400m", 1536: "vit-g"}
# recorded settings an import may still change: the text length is a data choice (the positions are
# sinusoidal), not part of the weights
_FREE_ON_IMPORT = {"text.max_len"}


def config_for(imported: Imported, overrides: list[str] = ()):
    """The fasttips config of an imported model: its run's own config, or the preset of its width
    with the source's architecture (settings the files do not record from the released models'
    conventions unless ``overrides`` give them; refused when neither does), the release's pixel
    normalisation and a logit-scale cap that keeps the imported scales (then ``overrides``)."""
    from fasttips import config as config_lib
    given = [_split_override(item) for item in overrides]
    if imported.cfg is not None:
        cfg = config_lib.from_dict(config_lib.to_dict(imported.cfg))
    else:
        missing = formats.undetermined_error(imported, dict(given))
        if missing is not None:
            raise missing
        width = imported.overrides.get("vision.width")
        cfg = config_lib.load(None, [f"preset={_PRESET_BY_WIDTH.get(width, 'tiny')}"])
        for key, value in {**imported.conventions, **imported.overrides}.items():
            config_lib.set_value(cfg, key, value)
        config_lib.set_value(cfg, "data.pixel_norm", imported.overrides.get("data.pixel_norm", "tips"))
        scale = imported.state.get("logit_scale")
        if scale is not None and float(scale.max()) > math.log(cfg.loss.max_logit_scale):
            config_lib.set_value(cfg, "loss.max_logit_scale", float(math.ceil(math.exp(float(scale.max())))))
    for key, value in given:
        config_lib.set_value(cfg, key, value)
        section, name = key.split(".", 1)
        if key in imported.overrides and key not in _FREE_ON_IMPORT and \
                getattr(getattr(cfg, section), name) != imported.overrides[key]:
            raise SourceError(f"{key}={value}: {imported.path} records {key}={imported.overrides[key]}; a model "
                              "built otherwise would not give the source's features")
    config_lib.validate(cfg)
    return cfg


def _split_override(item: str):
    from fasttips import config as config_lib
    key, sep, value = item.partition("=")
    if not sep:
        raise config_lib.ConfigError(f"override {item!r}: expected key=value")
    import yaml
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def export(src, to: str, out, weights: str = "student", img_size: int | None = None,
           overrides: list[str] = ()) -> list[Path]:
    """Write ``src``'s towers in the ``to`` format under ``out``; returns the files written.
    ``overrides``: settings the source does not record (e.g. ``vision.heads=4``), nothing else."""
    if to not in ("hf", "timm", "tips"):
        raise ValueError(f"--to: {to!r} is not allowed; choose one of ['hf', 'timm', 'tips']")
    imported = read_source(src, weights)
    unrecorded = {**imported.conventions, **imported.undetermined}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in unrecorded:
            raise ValueError(f"export: {item!r}: only settings the source does not record can be given"
                             f"{' (here: ' + ', '.join(unrecorded) + ')' if unrecorded else ' (it records them all)'}")
    for note in imported.notes:
        print(f"note: {note}", file=sys.stderr)
    cfg = config_for(imported, overrides)
    out = Path(out)
    if to == "timm":
        return formats.write_timm(out, imported.state, cfg, img_size)
    if img_size is not None:
        raise ValueError("--img-size applies to --to timm only (the other formats resize the grid like fasttips)")
    if not imported.has_text:
        raise SourceError(f"{src}: holds no text tower ({imported.kind}); only --to timm can be written")
    if imported.tokenizer is not None:
        _refuse_shifted_tokenizer(imported.tokenizer, src)
    if to == "hf":
        if imported.tokenizer is None:
            raise SourceError(f"{src}: no tokenizer.model; a transformers folder needs the tokenizer")
        return formats.write_hf(out, imported.state, cfg, imported.tokenizer)
    return formats.write_tips(out, imported.state, imported.tokenizer)


def _refuse_shifted_tokenizer(proto: bytes, src) -> None:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    if sp.pad_id() != 0:
        raise SourceError(f"{src}: the run's tokenizer has no pad piece at id 0, so fasttips fed the text "
                          "tower ids shifted by one; transformers and the TIPS code would feed the "
                          "unshifted ids. Train with a tokenizer whose pad id is 0 "
                          "('fasttips data tokenizer' makes one)")


# ------------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------------
def import_release(src, out, overrides: list[str] = ()) -> Path:
    """A release (or any accepted source) → fasttips run dir ``out`` with one checkpoint at step 0
    holding the towers and logit scales (fresh heads), its config and its tokenizer."""
    import torch

    from fasttips import config as config_lib
    from fasttips.distributed.checkpoint import CheckpointManager, latest_checkpoint
    from fasttips.models import build_model

    from .warmstart import _CACHE, check_tokenizer, init_from

    out = Path(out)
    if latest_checkpoint(out / "checkpoints") is not None:
        raise SourceError(f"{out}: already holds a run; choose another OUT")
    imported = read_source(src)
    if not imported.has_text:
        raise SourceError(f"{src}: holds no text tower ({imported.kind}); fasttips eval needs both towers")
    check_tokenizer(imported.tokenizer, imported.state["text.token_embed.weight"].shape[0], src)
    cfg = config_for(imported, overrides)
    config_lib.set_value(cfg, "data.tokenizer", "")          # the checkpoint carries tokenizer.model
    config_lib.set_value(cfg, "train.run_dir", str(out))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, device="cpu")
    _CACHE.clear()
    init_from(model, src, cfg)
    ctx = SimpleNamespace(rank=0, world_size=1, is_main=True, barrier=lambda: None)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out / "config.yaml")
    files = {"config.yaml": (out / "config.yaml").read_bytes(), "tokenizer.model": imported.tokenizer}
    meta = {"reason": f"imported from {src}", "imported_from": str(src), "nonfinite_total": 0}
    manager = CheckpointManager(out / "checkpoints", keep=1, ctx=ctx)
    return manager.save(0, {"model": model.state_dict()}, {}, files, meta)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttips", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a model as a transformers folder, a timm file or TIPS npz files")
    ex.add_argument("src", metavar="SRC", help="fasttips run dir or step_* checkpoint (or any importable source)")
    ex.add_argument("--to", required=True, choices=["hf", "timm", "tips"], help="target format")
    ex.add_argument("out", metavar="OUT", help="output folder")
    ex.add_argument("--weights", default="student", choices=["student", "teacher"],
                    help="student weights (default) or the EMA teacher's (teacher.mode=full_ema runs "
                         "have a teacher vision tower; head_ema teachers share the student's towers)")
    ex.add_argument("--img-size", type=int, default=None, metavar="PX",
                    help="timm only: the input size timm will run at; the position grid is stored resized "
                         "to it the release's way (timm itself resizes bicubically), and timm's preprocessing "
                         "config says this size. Default: the native grid")
    ex.add_argument("overrides", nargs="*", metavar="key=value",
                    help="settings the source does not record, e.g. vision.heads=4 for a TIPS npz pair whose "
                         "width is not a released size")
    im = sub.add_parser("import", help="turn a release into a fasttips run dir for 'fasttips eval'")
    im.add_argument("src", metavar="SRC", help="Hugging Face tipsv2 folder, TIPS npz pair or fasttips run")
    im.add_argument("out", metavar="OUT", help="new run dir to create")
    im.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides (e.g. heads.prototypes=4096); vision.heads=N where the source does not "
                         "record the head count")
    return parser


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """``command``: "export" or "import" when the dispatcher already consumed the sub-command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        argv = [command] + argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            written = export(args.src, args.to, args.out, args.weights, args.img_size, args.overrides)
            for path in written:
                print(path)
            if args.to == "timm":
                print("load with: " + formats.timm_create_call(Path(args.out)))
            elif args.to == "hf":
                print(f"load with: transformers.AutoModel.from_pretrained({str(args.out)!r})")
        else:
            ckpt = import_release(args.src, args.out, args.overrides)
            print(f"{ckpt}\nevaluate with: fasttips eval {args.out}")
    except (SourceError, LayoutError, ValueError, FileNotFoundError) as exc:
        print(f"fasttips {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def export_main(argv: list[str] | None = None) -> int:
    return main(argv, "export")


def import_main(argv: list[str] | None = None) -> int:
    return main(argv, "import")


if __name__ == "__main__":
    sys.exit(main())

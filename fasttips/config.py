"""Configuration: dataclasses, named presets, YAML files and dotted ``key=value`` overrides.

Every field has a default, a help text and, where it has one, its allowed range, declared beside it
with ``setting(...)``; ``validate`` checks every range generically, then the few rules that tie two
fields together. Allowed words are the ``Literal`` types below: the one place they are written
(other modules import the tuples, e.g. ``CENTERINGS``). A wrong key or value fails at start with a
``ConfigError`` that names the field and what is allowed; nothing is changed behind the user's back.
The resolved config is saved to the run directory as YAML so a run can be reproduced or resumed.
"""
from __future__ import annotations

import importlib.util
import math
import textwrap
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config field has a wrong name, type or value."""


# ----------------------------------------------------------------------------------------------
# Allowed words: written once here; code elsewhere imports the tuples.
# ----------------------------------------------------------------------------------------------
Ffn = Literal["gelu", "swiglu"]
ContrastiveLoss = Literal["clip", "siglip"]
Centering = Literal["softmax", "sinkhorn_knopp"]
IbotTokens = Literal["all", "masked"]
PrototypeCe = Literal["auto", "fused", "slab", "chunked"]
TeacherMode = Literal["head_ema", "full_ema"]
TeacherFeatures = Literal["detached", "separate_no_grad"]
MomentumSchedule = Literal["cosine", "constant"]
DataSource = Literal["auto", "demo", "shards", "synthetic"]
LoaderKind = Literal["auto", "dali", "pytorch"]
ValidateMode = Literal["auto", "header", "full"]
PixelNorm = Literal["tips", "imagenet"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
WandbMode = Literal["online", "offline"]
KernelDispatch = Literal["measured", "fasttips", "pytorch"]
CompileMode = Literal["off", "blocks", "step"]
ActivationCheckpointing = Literal["off", "full", "every_k", "selective"]

FFNS = get_args(Ffn)
CONTRASTIVE_LOSSES = get_args(ContrastiveLoss)
CENTERINGS = get_args(Centering)
IBOT_TOKENS = get_args(IbotTokens)
PROTOTYPE_CES = get_args(PrototypeCe)
TEACHER_MODES = get_args(TeacherMode)
TEACHER_FEATURES = get_args(TeacherFeatures)
PIXEL_NORMS = get_args(PixelNorm)
COMPILE_MODES = get_args(CompileMode)
AC_POLICIES = get_args(ActivationCheckpointing)


def setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, ordered: bool = False):
    """A config field: default, one-line help (meaning and unit) and its allowed range.

    ``ge``/``gt``/``le``/``lt`` bound a number (each element of a pair); ``ordered`` asks a pair to
    be (low, high). Every float must also be finite. ``validate`` checks these for every field.
    """
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt,
                                            "ordered": ordered})


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    """The image tower: a ViT with two CLS tokens."""
    width: int = setting(384, "token width D of the image tower (channels)", ge=1)
    depth: int = setting(12, "transformer blocks", ge=1)
    heads: int = setting(6, "attention heads; must divide vision.width (the presets keep 64 channels "
                            "per head, the attention kernel's head size)", ge=1)
    mlp_hidden: int = setting(1536, "hidden channels of each block's MLP (swiglu: of each of its two "
                                    "branches)", ge=1)
    ffn: Ffn = setting("gelu", "block MLP: GELU MLP or SwiGLU")
    patch_size: int = setting(14, "patch side in pixels; data.global_size and data.local_size must be "
                                  "multiples of it", ge=1)
    pos_grid: int = setting(16, "side of the learned 2-D position grid (in patches), resized to each "
                                "crop's patch grid", ge=1)
    layerscale: float = setting(0.0, "LayerScale initial value; 0 = no LayerScale (as TIPS)", ge=0)
    drop_path: float = setting(0.0, "stochastic-depth probability, the same in every block; 0 = off",
                               ge=0, lt=1)
    ln_eps: float = setting(1e-6, "LayerNorm epsilon", gt=0)
    qkv_bias: bool = setting(True, "bias on the query/key/value projection")
    # Not a setting: TIPS has exactly two CLS tokens, CLS#1 (alt-text) and CLS#2 (synthetic caption).
    n_cls: ClassVar[int] = 2


@dataclass
class TextConfig:
    """The text tower (its width, heads and MLP width follow the image tower)."""
    vocab_size: int = setting(32000, "SentencePiece vocabulary size (id 0 is padding)", ge=2)
    depth: int = setting(12, "transformer blocks", ge=1)
    max_len: int = setting(64, "tokens per caption; longer captions are cut", ge=1)
    ln_eps: float = setting(1e-6, "LayerNorm epsilon", gt=0)
    dropout: float = setting(0.0, "dropout probability on each block's attention and MLP outputs",
                             ge=0, lt=1)


@dataclass
class HeadConfig:
    """The DINO and iBOT projection heads: MLP → L2-normalised bottleneck → prototypes."""
    hidden: int = setting(2048, "hidden channels of each head MLP", ge=1)
    bottleneck: int = setting(256, "channels of the L2-normalised bottleneck", ge=1)
    prototypes: int = setting(65536, "prototypes K: outputs of the weight-normed last layer", ge=1)
    nlayers: int = setting(3, "linear layers of each head MLP (D → hidden → … → bottleneck)", ge=1)
    shared: bool = setting(False, "one head for DINO and iBOT instead of two")


@dataclass
class LossConfig:
    """Loss terms, their weights and temperatures (docs/loss_math.md)."""
    contrastive: ContrastiveLoss = setting("clip", "image-text loss: CLIP softmax or SigLIP sigmoid")
    contrastive_weight: float = setting(0.5, "weight of each of the two contrastive losses (CLS#1 ↔ "
                                             "alt-text, CLS#2 ↔ synthetic caption); 0.5 = TIPS's ½(L + L̂)",
                                        ge=0)
    dino_weight: float = setting(1.0, "weight of the DINO loss (CLS#1 of local crops vs teacher)", ge=0)
    ibot_weight: float = setting(1.0, "weight of the iBOT/iBOT++ patch loss", ge=0)
    koleo_weight: float = setting(0.0, "weight of the KoLeo spread loss on CLS#1; 0 = not computed",
                                  ge=0)
    student_temp: float = setting(0.1, "student softmax temperature", gt=0)
    teacher_temp: float = setting(0.04, "teacher softmax temperature at step 0", gt=0)
    teacher_temp_final: float = setting(0.07, "teacher temperature after the warm-up", gt=0)
    teacher_temp_warmup_steps: int = setting(30, "optimiser steps of the linear ramp from "
                                                 "loss.teacher_temp to loss.teacher_temp_final", ge=0)
    centering: Centering = setting("softmax", "how teacher targets are centred: a running center "
                                              "(softmax) or Sinkhorn-Knopp")
    center_momentum: float = setting(0.9, "EMA momentum of the softmax centers", ge=0, le=1)
    sk_iterations: int = setting(3, "Sinkhorn-Knopp iterations (loss.centering=sinkhorn_knopp)", ge=1)
    prototype_ce: PrototypeCe = setting("auto", "DINO/iBOT prototype cross-entropy implementation: auto = the "
                                                "one kernels.dispatch picks; fused, slab or chunked force that "
                                                "Triton path on GPU (kernels/dino_loss/NOTES.md)")
    ibot_tokens: IbotTokens = setting("all", "patch tokens in the iBOT loss: all = iBOT++ (TIPSv2), "
                                             "masked = DINOv2's iBOT")
    ibot_masked_weight: float = setting(1.0, "iBOT++ weight of the masked patch tokens", ge=0)
    ibot_visible_weight: float = setting(1.0, "iBOT++ weight of the visible patch tokens "
                                              "(unused with loss.ibot_tokens=masked)", ge=0)
    init_logit_scale: float = setting(2.6592600, "initial log(1/τ) of each contrastive loss "
                                                 "(2.659 = log(1/0.07)); at most ln(loss.max_logit_scale)")
    max_logit_scale: float = setting(100.0, "cap on 1/τ = exp(logit scale), applied after each step",
                                     gt=0)


@dataclass
class TeacherConfig:
    """The EMA teacher."""
    mode: TeacherMode = setting("head_ema", "head_ema = EMA of the heads only (TIPSv2); full_ema = EMA "
                                            "copy of the image tower too (TIPS v1 / DINOv2)")
    features: TeacherFeatures = setting("detached", "head_ema only: teacher features are the student's "
                                                    "unmasked forward, detached, or a separate no-grad "
                                                    "eval-mode pass (full_ema runs its own EMA backbone)")
    momentum: float = setting(0.994, "EMA momentum at step 0 (teacher ← m·teacher + (1−m)·student)",
                              ge=0, le=1)
    momentum_final: float = setting(1.0, "EMA momentum at the last step (teacher.schedule=cosine)",
                                    ge=0, le=1)
    schedule: MomentumSchedule = setting("cosine", "momentum: cosine from teacher.momentum to "
                                                   "teacher.momentum_final over train.steps, or constant")


@dataclass
class DataConfig:
    """Images, captions, crops and masks."""
    source: DataSource = setting("auto", "auto = the shards at data.path when it is set, else the demo data; "
                                         "demo = the embedded demo set (kept in the cache, never in data.path); "
                                         "shards = WebDataset tars at data.path; synthetic = random tensors "
                                         "(speed tests)")
    path: str = setting("", "shard folder, .tar file or glob, local or an fsspec URL (s3://, gs://, "
                                "https://, file://...; selects shards)")
    caption_fields: str = setting("alt=json:alt,short=json:short,long=json:long",
                                  "shard members/fields giving each caption granularity, alternatives "
                                  "separated by |; e.g. 'alt=txt|json:caption' for img2dataset shards")
    loader: LoaderKind = setting("auto", "auto = DALI when installed, else PyTorch")
    batch_size: int = setting(32, "images per process per micro-batch", ge=1)
    num_workers: int = setting(2, "loader worker processes (pytorch) or threads (DALI) per process",
                               ge=0)
    global_size: int = setting(224, "global crop side in pixels", ge=1)
    n_global: int = setting(1, "global crops per image (2 = DINOv2 cross-global pairs)", ge=1)
    global_scale: tuple[float, float] = setting((0.32, 1.0), "(min, max) fraction of the image area a "
                                                             "global crop covers", gt=0, le=1, ordered=True)
    local_size: int = setting(98, "local crop side in pixels", ge=1)
    n_local: int = setting(8, "local crops per image (0 = none)", ge=0)
    local_scale: tuple[float, float] = setting((0.05, 0.32), "(min, max) fraction of the image area a "
                                                             "local crop covers", gt=0, le=1, ordered=True)
    mask_probability: float = setting(0.5, "probability that a global crop gets an iBOT mask", ge=0, le=1)
    mask_ratio: tuple[float, float] = setting((0.1, 0.5), "(min, max) fraction of a masked crop's "
                                                          "patches that are masked", ge=0, le=1, ordered=True)
    caption_short_prob: float = setting(0.5, "probability that CLS#2 gets the short synthetic caption "
                                             "(else the long one)", ge=0, le=1)
    pixel_norm: PixelNorm = setting("tips", "pixel normalisation: tips = [0, 1] only; imagenet = "
                                            "ImageNet mean/std")
    tokenizer: str = setting("", "SentencePiece .model file; empty = train one from the captions")
    index_dir: str = setting("", "folder of the shard indexes, built once and shared by every rank (keyed by "
                                 "each shard's size and mtime, or URL and ETag); empty = "
                                 "$FASTTIPS_DATA_DIR/index or ~/.cache/fasttips/index; a shared "
                                 "filesystem path lets all nodes reuse one")
    validate: ValidateMode = setting("auto", "image check when indexing: header = headers and ends only "
                                             "(cheap; a bad image met later is skipped and counted); full = "
                                             "decode each image once; auto = full for the DALI loader (a "
                                             "corrupt image stops DALI), else header")
    retries: int = setting(3, "retries of a failed remote shard read (s3://, gs://, https://...), with "
                              "exponential backoff", ge=0)
    outage_deadline_s: float = setting(600.0, "seconds a training run keeps trying a remote shard that "
                                              "stops answering once data.retries are spent (pauses of up to "
                                              "30 s); then it checkpoints and stops with exit 5, and --resume "
                                              "continues with the samples not yet seen. An outage never "
                                              "skips samples; 0 = stop at once", ge=0)


@dataclass
class OptimConfig:
    """AdamW and its schedules."""
    lr: float = setting(1e-3, "peak learning rate at a global batch of 1024 images (scaled by "
                              "sqrt(global batch / 1024))", gt=0)
    min_lr: float = setting(1e-6, "learning rate at the end of the cosine decay", ge=0)
    warmup_steps: int = setting(10, "optimiser steps of linear lr warm-up from 0", ge=0)
    weight_decay: float = setting(0.04, "weight decay at step 0", ge=0)
    weight_decay_final: float = setting(0.2, "weight decay at the last step (cosine)", ge=0)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW (beta1, beta2)", ge=0, lt=1)
    layer_decay: float = setting(1.0, "layer-wise lr decay per block, counted from the top; 1 = off",
                                 gt=0, le=1)
    patch_embed_lr_mult: float = setting(0.2, "lr multiplier of the patch embedding", ge=0)
    freeze_prototypes_steps: int = setting(0, "optimiser steps during which the prototype layers are "
                                              "not updated", ge=0)
    freeze_backbone_steps: int = setting(0, "optimiser steps during which only the heads train (the "
                                            "towers and logit scales get no update): the warm-up of a "
                                            "fine-tune from train.init_from", ge=0)
    clip_grad: float = setting(3.0, "max gradient norm per module (backbone, each head); 0 = no clipping",
                               ge=0)
    accum_steps: int = setting(1, "micro-batches accumulated per optimiser step", ge=1)


@dataclass
class TrainConfig:
    """The run: length, device, logging and checkpoints."""
    steps: int = setting(100, "optimiser steps in the run", ge=1)
    seed: int = setting(0, "random seed (any integer; each rank adds 1000 × its rank; a resume on another "
                           "number of ranks seeds each rank from (seed, step, rank))")
    device: Device = setting("auto", "auto = CUDA when available, else CPU")
    precision: Precision = setting("auto", "parameter precision: auto = bf16 on CUDA, fp32 on CPU")
    run_dir: str = setting("runs/default", "output folder: config, metrics, checkpoints, plots")
    log_every: int = setting(1, "metrics line every N steps (also the last and every skipped step)", ge=1)
    ckpt_every: int = setting(50, "checkpoint every N steps (and at the end and when stopped)", ge=1)
    keep_ckpts: int = setting(2, "complete checkpoints kept; older ones are deleted", ge=1)
    async_checkpoint: bool = setting(True, "write checkpoints in the background while the steps go on "
                                           "(DCP async_save from a host copy, pinned on a GPU; one write in "
                                           "flight); supported: one process, gloo or NCCL; false = the "
                                           "step loop waits for each write")
    max_nonfinite: int = setting(5, "consecutive non-finite steps (skipped) before the run stops", ge=1)
    wandb_project: str = setting("", "Weights & Biases project for the metrics, config and loss curve "
                                     "(pip install 'fasttips[wandb]'); empty = off")
    wandb_mode: WandbMode = setting("online", "W&B: online = upload as it runs; offline = write under "
                                              "RUN_DIR/wandb for a later `wandb sync`")
    compile: CompileMode = setting("off", "torch.compile: off; blocks = each transformer block on its own "
                                          "(one graph reused by every block); step = the whole student "
                                          "forward (towers, heads, losses) as one graph (needs torch >= 2.12). A "
                                          "boolean from an older config reads as true = blocks, false = off")
    activation_checkpointing: ActivationCheckpointing = setting(
        "off", "recompute transformer-block activations in the backward (less memory, more compute): "
               "full = every block keeps only its input; every_k = blocks k, 2k, ... of each tower "
               "(train.ac_every = k) as full, the others keep everything; selective = every block keeps "
               "its matmul and attention outputs and recomputes the cheap ops (norms, activations, "
               "softmax, elementwise); true/false (older configs) mean full/off")
    ac_every: int = setting(2, "k of train.activation_checkpointing=every_k: recompute every k-th block of "
                               "each tower, counted from its first (1 = every block, as full); at most the "
                               "deeper tower's depth", ge=1)
    init_from: str = setting("", "warm start: a Hugging Face tipsv2 folder, a TIPS npz pair or a fasttips "
                                 "run; its towers and logit scales, fresh heads and optimiser (README)")


@dataclass
class EvalConfig:
    """Evaluation during training."""
    every: int = setting(0, "evaluate every N steps; 0 = only when asked (fasttips eval)", ge=0)
    n_images: int = setting(64, "demo images used by each evaluation", ge=1)
    suites: str = setting("", "benchmark suites that eval.every runs instead of the demo evaluation, "
                              "comma-separated, as `fasttips eval --suite` takes them (e.g. 'knn,voc-linear'); "
                              "metrics.jsonl gets eval/<suite>/<metric>; empty = the demo evaluation")
    data_root: str = setting("", "folder holding the eval.suites datasets, each in its usual folder under it "
                                 "(as `fasttips eval --data-root`)")
    limit: int = setting(0, "eval.suites: only the first N samples of each split, to keep a periodic "
                            "evaluation cheap; 0 = all", ge=0)


@dataclass
class DistConfig:
    """How the ranks of a torchrun job share the model (FSDP2 over a device mesh)."""
    shard_size: int = setting(0, "ranks per FSDP2 shard group: parameters, gradients and optimiser state "
                                 "are sharded inside a group and replicated across groups (HSDP, a 2-D "
                                 "replicate × shard mesh), typically the GPUs of one node; must divide "
                                 "the number of ranks; 0 = all ranks (plain FSDP)", ge=0)


@dataclass
class KernelsConfig:
    """Which implementation each fasttips.kernels op runs (README "Kernels: which implementation runs")."""
    dispatch: KernelDispatch = setting("measured", "measured = time each op's implementations (fasttips "
                                                   "kernels, SDPA backends, flash-attn, ...) at its first call "
                                                   "of each shape on this device and run the fastest (CPU "
                                                   "tensors: the PyTorch references, untimed); fasttips = the "
                                                   "Triton kernels on CUDA; pytorch = PyTorch's own ops")
    deterministic: bool = setting(False, "measured dispatch admits only implementations whose backward is "
                                         "deterministic")
    budget_s: float = setting(30.0, "seconds of first-use timing per op and shape (the later candidates "
                                    "are skipped once it is spent)", gt=0)
    memory_fraction: float = setting(0.5, "share of the free device memory an implementation's working set "
                                          "may take to be timed or chosen (prototype cross-entropy)",
                                     gt=0, le=1)
    cache: str = setting("", "file of measured decisions, reused by later runs on the same device and "
                             "versions; empty = $FASTTIPS_DISPATCH_CACHE or ~/.cache/fasttips/dispatch.json; "
                             "off = none")


@dataclass
class Config:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


# ----------------------------------------------------------------------------------------------
# Presets: only what differs from the defaults above.
# ----------------------------------------------------------------------------------------------
_LARGE_HEADS = {"heads.prototypes": 65536, "heads.hidden": 2048, "heads.bottleneck": 256}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: 64-d heads (the attention kernel's head dim), tiny images, finishes in minutes.
    "tiny": {
        "vision.width": 128, "vision.depth": 2, "vision.heads": 2, "vision.mlp_hidden": 256,
        "text.vocab_size": 1000, "text.depth": 2, "text.max_len": 32,
        "heads.hidden": 256, "heads.bottleneck": 64, "heads.prototypes": 512,
        "data.batch_size": 16, "data.global_size": 112, "data.local_size": 56, "data.n_local": 2,
        "data.num_workers": 0,
        # lr 8e-3 is a peak of 1e-3 after the sqrt(batch/1024) rule; 300 steps is about a minute on
        # 2 cores and is enough for retrieval to rise well above chance (docs/ablation.md).
        "optim.lr": 8e-3, "optim.warmup_steps": 30, "train.steps": 300, "train.ckpt_every": 100,
        "loss.teacher_temp_warmup_steps": 20,
    },
    "vit-s": {"vision.width": 384, "vision.depth": 12, "vision.heads": 6, "vision.mlp_hidden": 1536,
              **_LARGE_HEADS},
    "vit-b": {"vision.width": 768, "vision.depth": 12, "vision.heads": 12, "vision.mlp_hidden": 3072,
              **_LARGE_HEADS},
    "vit-l": {"vision.width": 1024, "vision.depth": 24, "vision.heads": 16, "vision.mlp_hidden": 4096,
              **_LARGE_HEADS},
    "so400m": {"vision.width": 1152, "vision.depth": 27, "vision.heads": 16, "vision.mlp_hidden": 4304,
               "text.depth": 27, **_LARGE_HEADS},
    "vit-g": {"vision.width": 1536, "vision.depth": 40, "vision.heads": 24, "vision.mlp_hidden": 4096,
              "vision.ffn": "swiglu", "vision.pos_grid": 32, **_LARGE_HEADS},
}


# ----------------------------------------------------------------------------------------------
# Keys that used to be settings: a config saved by an older run may still hold them.
# ----------------------------------------------------------------------------------------------
RETIRED: dict[str, tuple[Any, str]] = {
    "vision.n_cls": (2, "TIPS always has two CLS tokens, CLS#1 (alt-text) and CLS#2 (synthetic caption)"),
}


# Fields whose type changed from a bool: the values an older config may hold, and what they mean now.
# (YAML also reads a bare on/off as true/false, so `train.compile=off` arrives here as False.)
LEGACY_VALUES: dict[str, dict[bool, Any]] = {
    "train.compile": {False: "off", True: "blocks"},                    # was a bool: true compiled each block
    "train.activation_checkpointing": {False: "off", True: "full"},     # was a bool: true recomputed every block
}


def _legacy(dotted: str, value: Any) -> Any:
    if isinstance(value, bool) and dotted in LEGACY_VALUES:
        return LEGACY_VALUES[dotted][value]
    return value


def _retired(dotted: str, value: Any) -> bool:
    """True (after a warning) for a retired key holding its only possible value; raise for another."""
    if dotted not in RETIRED:
        return False
    fixed, why = RETIRED[dotted]
    if value != fixed:
        raise ConfigError(f"{dotted}: is no longer a setting ({why}); remove it")
    warnings.warn(f"{dotted}: is no longer a setting ({why}); ignoring {dotted}={value!r}", stacklevel=3)
    return True


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(path: str, typ: Any, value: Any) -> Any:
    """Turn ``value`` (from YAML or a CLI string) into ``typ``, or raise ConfigError naming ``path``."""
    origin = get_origin(typ)
    if origin is Literal:
        allowed = get_args(typ)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is tuple:
        args = get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(path, a, v) for a, v in zip(args, value))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a {typ.__name__}, got {value!r}")
        try:
            out = typ(value) if not isinstance(value, str) else typ(float(value) if typ is float else int(value))
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{path}: expected a {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{path}: expected an int, got {value!r}")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {typ}")


def _section_and_field(cfg: Config, dotted: str):
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] == "preset":
        return cfg, "preset"
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: keys look like 'section.field'; sections are {_section_names()}")
    section, name = parts
    if section not in _section_names():
        raise ConfigError(f"{dotted}: unknown section {section!r}; choose one of {_section_names()}")
    obj = getattr(cfg, section)
    names = [f.name for f in fields(obj)]
    if name not in names:
        raise ConfigError(f"{dotted}: unknown field {name!r} in [{section}]; fields are {names}")
    return obj, name


def _section_names() -> list[str]:
    return [f.name for f in fields(Config) if f.name != "preset"]


def keys() -> list[str]:
    """Every ``section.field`` key, in declaration order."""
    cfg = Config()
    return [f"{sec}.{f.name}" for sec in _section_names() for f in fields(getattr(cfg, sec))]


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    if _retired(dotted, value):
        return
    obj, name = _section_and_field(cfg, dotted)
    typ = _hints(type(obj))[name]
    setattr(obj, name, _coerce(dotted, typ, _legacy(dotted, value)))


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset: {name!r} is not a preset; choose one of {list(PRESETS)}")
    cfg = Config(preset=name)
    for key, value in PRESETS[name].items():
        set_value(cfg, key, value)
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise ConfigError(f"--config: no such file {str(p)!r}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config: {p} is not UTF-8 text (byte {exc.start}); is it a YAML file?") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config: {p}{where} is not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a mapping of sections (e.g. 'train:' then "
                          f"'  steps: 10'), got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=10")
    key, value = item.split("=", 1)
    key = key.strip()
    if not value.strip():
        return key, ""
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value            # not a YAML scalar: the field's type decides (and names the key)


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
         check_machine: bool = True) -> Config:
    """Preset (from the file's or an override's ``preset``), then the YAML file, then overrides.

    Checks every value (``validate``) and, unless ``check_machine`` is False (planning a run for
    another machine: ``fasttips train --dry-run``), that this machine can run it (``check_runnable``)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_flatten(_read_yaml(Path(path))))
    parsed = [_parse_override(item) for item in overrides]
    name = dict(parsed).get("preset", values.get("preset", "tiny"))
    cfg = preset(str(name))
    for key, value in list(values.items()) + parsed:
        if key != "preset":
            set_value(cfg, key, value)
    validate(cfg)
    if check_machine:
        check_runnable(cfg)
    return cfg


def explicit_keys(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The dotted keys a user set in the YAML file or as overrides (not those the preset filled in)."""
    keys = set(_flatten(_read_yaml(Path(path)))) if path is not None else set()
    return keys | {_parse_override(item)[0] for item in overrides}


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:g}"


def range_text(meta) -> str:
    """The allowed range declared in a field's metadata, e.g. '>= 1' or 'in (0, 1]'; '' if none."""
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    low = f"[{_num(ge)}" if ge is not None else f"({_num(gt)}" if gt is not None else ""
    high = f"{_num(le)}]" if le is not None else f"{_num(lt)})" if lt is not None else ""
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {_num(ge)}" if ge is not None else f"> {_num(gt)}"
    if high:
        return f"<= {_num(le)}" if le is not None else f"< {_num(lt)}"
    return ""


def _check_range(path: str, value: Any, meta) -> None:
    items = value if isinstance(value, tuple) else (value,)
    each = "each value " if isinstance(value, tuple) else ""
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    for x in items:
        if isinstance(x, float) and not math.isfinite(x):
            raise ConfigError(f"{path}: {each}must be a finite number, got {value!r}")
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if ((ge is not None and x < ge) or (gt is not None and x <= gt)
                or (le is not None and x > le) or (lt is not None and x >= lt)):
            raise ConfigError(f"{path}: {each}must be {range_text(meta)}, got {value!r}")
    if meta.get("ordered") and items[0] > items[1]:
        raise ConfigError(f"{path}: expected (low, high) with low <= high, got {value!r}")


def validate(cfg: Config) -> None:
    """Every field's declared range, then the rules that tie fields together. Changes nothing."""
    for sec in _section_names():
        obj = getattr(cfg, sec)
        for f in fields(obj):
            _check_range(f"{sec}.{f.name}", getattr(obj, f.name), f.metadata)
    v = cfg.vision
    if v.width % v.heads:
        raise ConfigError(f"vision.heads: {v.heads} must divide vision.width={v.width}")
    for name in ("global_size", "local_size"):
        size = getattr(cfg.data, name)
        if size % v.patch_size:
            raise ConfigError(f"data.{name}: {size} is not a multiple of vision.patch_size={v.patch_size}")
    if cfg.loss.init_logit_scale > math.log(cfg.loss.max_logit_scale) + 1e-6:
        # the parameter is clamped to ln(max) after each step; starting above it would train one step unclamped
        raise ConfigError(f"loss.init_logit_scale: {cfg.loss.init_logit_scale} is above "
                          f"ln(loss.max_logit_scale) = {math.log(cfg.loss.max_logit_scale):.4f}")
    if cfg.data.source == "shards" and not cfg.data.path:
        raise ConfigError("data.path: required when data.source=shards (a folder or glob of .tar shards)")
    if cfg.data.source == "demo" and cfg.data.path:
        raise ConfigError(f"data.path: {cfg.data.path!r} is set but data.source=demo; the demo data never "
                          f"reads or writes data.path: use data.source=shards (or auto) to train on it")
    from fasttips.data.caption_fields import parse_caption_fields
    try:
        parse_caption_fields(cfg.data.caption_fields)
    except ValueError as exc:
        raise ConfigError(f"data.caption_fields: {exc}") from None
    t = cfg.train
    deepest = max(v.depth, cfg.text.depth)
    if t.activation_checkpointing == "every_k" and t.ac_every > deepest:
        raise ConfigError(f"train.ac_every: {t.ac_every} is more than the deeper tower's depth {deepest} "
                          f"(vision.depth={v.depth}, text.depth={cfg.text.depth}), so "
                          f"train.activation_checkpointing=every_k would recompute no block")
    if not cfg.train.run_dir.strip():
        raise ConfigError("train.run_dir: must not be empty (a folder for the run's outputs)")
    if cfg.eval.suites.strip() and not cfg.eval.data_root.strip():
        raise ConfigError("eval.data_root: required when eval.suites is set (the folder holding their datasets)")


def check_runnable(cfg: Config) -> None:
    """What this machine must offer for ``cfg``: the device, the loader's package, a usable run dir."""
    if cfg.train.compile == "step":
        import torch
        problem = step_compile_problem(torch.__version__)
        if problem:
            raise ConfigError(problem)
    if cfg.train.device == "cuda":
        import torch                    # only here: the config itself does not need torch
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda, but torch sees no CUDA device; use train.device=cpu or auto")
    if cfg.data.loader == "dali" and cfg.data.source != "synthetic" and not _installed("nvidia.dali"):
        raise ConfigError("data.loader: dali, but nvidia.dali is not installed "
                          "(pip install 'fasttips[dali]', or use data.loader=pytorch)")
    if cfg.train.wandb_project and not _installed("wandb"):
        raise ConfigError("train.wandb_project: set, but wandb is not installed "
                          "(pip install 'fasttips[wandb]', or leave train.wandb_project empty)")
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir: {str(run_dir)!r} is a file, not a folder; choose another path")
    existing = next((p for p in run_dir.absolute().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():     # the folder could never be created
        raise ConfigError(f"train.run_dir: {str(run_dir)!r} is under {str(existing)!r}, which is a file, "
                          "not a folder; choose another path")


STEP_COMPILE_MIN_TORCH = (2, 12)   # torch 2.11 compiles the whole step with wrong gradients (below)


def step_compile_problem(torch_version: str) -> str | None:
    """Why ``train.compile=step`` cannot run under ``torch_version`` (None: it can). Under torch 2.11
    the compiled step's backward gives the vision tower wrong gradients from its second call on (the
    losses still match eager, the weights drift); torch 2.12.1 and 2.13 match eager exactly."""
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    if (major, minor) >= STEP_COMPILE_MIN_TORCH:
        return None
    need = ".".join(map(str, STEP_COMPILE_MIN_TORCH))
    return (f"train.compile: step needs torch >= {need}; torch {torch_version} computes wrong gradients "
            f"for the compiled step from its second call on; use train.compile=blocks or off")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:         # the parent package is missing
        return False


# ----------------------------------------------------------------------------------------------
# Saving, loading a saved config, and the field reference
# ----------------------------------------------------------------------------------------------
def to_dict(cfg: Config) -> dict[str, Any]:
    def convert(x):
        if is_dataclass(x):
            return {f.name: convert(getattr(x, f.name)) for f in fields(x)}
        if isinstance(x, tuple):
            return list(x)
        return x
    return convert(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    """A saved config (``to_dict``/YAML) back, validated; no check of this machine (see ``load``)."""
    flat = _flatten(d)
    cfg = preset(str(flat.pop("preset", "tiny")))
    for key, value in flat.items():
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _type_text(typ: Any, meta) -> str:
    if get_origin(typ) is Literal:
        name = "|".join(map(str, get_args(typ)))
    elif get_origin(typ) is tuple:
        name = ",".join(a.__name__ for a in get_args(typ))
    else:
        name = typ.__name__
    rules = range_text(meta)
    if rules:
        name += f", {'each ' if get_origin(typ) is tuple else ''}{rules}"
    if meta.get("ordered"):
        name += ", low <= high"
    return name


def describe() -> str:
    """Per field: a line with its name, type, allowed range and default, then what it means, indented
    and wrapped at 100 columns (used by ``--help`` and the README)."""
    lines = []
    cfg = Config()
    for sec in _section_names():
        obj = getattr(cfg, sec)
        hints = _hints(type(obj))
        for f in fields(obj):
            default = getattr(obj, f.name)
            lines.append(f"  {sec}.{f.name} ({_type_text(hints[f.name], f.metadata)}) = {default!r}")
            lines += textwrap.wrap(f.metadata["help"], width=100, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6, break_on_hyphens=False)
    return "\n".join(lines)


__all__ = ["Config", "ConfigError", "PRESETS", "RETIRED", "load", "preset", "save", "set_value", "to_dict",
           "from_dict", "validate", "check_runnable", "step_compile_problem", "describe", "keys", "setting",
           "CENTERINGS", "COMPILE_MODES", "CONTRASTIVE_LOSSES", "FFNS", "IBOT_TOKENS", "PIXEL_NORMS", "PROTOTYPE_CES",
           "TEACHER_FEATURES", "TEACHER_MODES", "AC_POLICIES"] + [c.__name__ for c in (
               VisionConfig, TextConfig, HeadConfig, LossConfig, TeacherConfig, DataConfig,
               OptimConfig, TrainConfig, EvalConfig, DistConfig, KernelsConfig)]


if __name__ == "__main__":  # `python -m fasttips.config` prints the field reference used in the README
    print(describe())

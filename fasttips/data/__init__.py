"""Data: shards, embedded demo data, tokenizer, multi-crop, iBOT masks, DALI and PyTorch loaders.

Modules, one job each:

- ``batch``          the batch contract every loader satisfies (+ ``synthetic_batch``)
- ``loader``         ``build_loader(cfg, rank, world_size)``: the entry point
- ``shards``         WebDataset tar shards: write, find, index + validate (bad samples counted), read
- ``pipeline``       the per-rank sample stream, seeds, and assembling a batch (shared by both loaders)
- ``pytorch_loader`` DataLoader + Pillow workers
- ``dali_loader``    NVIDIA DALI graph (GPU ``mixed`` decoding, or the same graph on CPU)
- ``decode``         image bytes -> 8-bit RGB with the same pixels as DALI (Pillow loader, eval)
- ``augment``        DINOv2 multi-crop recipe on Pillow images, pixel normalisation
- ``masks``          iBOT block masks (C++ ``fasttips._native`` + Python twin), stratified per batch
- ``captions``       which caption CLS#1 / CLS#2 see
- ``tokenizer``      SentencePiece, lower-case, pad id 0, no BOS/EOS
- ``scenes``, ``demo`` the embedded demo data (procedural scenes with class masks + skimage photos)
- ``cli``            ``fasttips data pack | tokenizer | demo | check``
"""


def __getattr__(name):  # light package import; the heavy modules load on first use
    if name == "build_loader":
        from .loader import build_loader
        return build_loader
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    if name == "ensure_demo_data":
        from .demo import ensure_demo_data
        return ensure_demo_data
    raise AttributeError(f"module 'fasttips.data' has no attribute {name!r}")

"""Distributed training on PyTorch's own engine: torchrun, FSDP2 (``fsdp.py``), DCP checkpoints
written atomically (``checkpoint.py``) and signal handling (``signals.py``)."""

"""fasttips: a custom-kernel training engine for TIPSv2-style image-text pretraining."""
__version__ = "0.1.0"

try:  # optional native extension built from csrc/ by setup.py
    from . import _native  # noqa: F401
    HAS_NATIVE = True
except ImportError:
    HAS_NATIVE = False

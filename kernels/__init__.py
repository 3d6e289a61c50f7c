"""fasttips.kernels: the hot paths, each a Triton kernel with a PyTorch reference beside it.

Public ops (one name each, in four places: ``kernels/<op>/reference.py``, ``kernels/<op>/triton.py``,
``tests/kernels/test_<op>.py`` and ``bench/bench_<op>.py``):

- ``attention`` / ``attention_varlen``: non-causal flash attention (dense with key padding, or packed).
- ``prototype_cross_entropy``: weight-normed prototype layer + centred teacher softmax + CE for
  DINO / iBOT / iBOT++, without materialising [rows × K].
- ``ema_update_``: head EMA over a list of tensors in one launch.

The ops live in ``ops.py``. Which implementation runs a call: an op's ``backend=`` argument, else the
deployment override ``FASTTIPS_KERNELS=auto|triton|reference`` (``_backend.py``), else the measured
dispatch (``dispatch/``): the fastest implementation timed on this device for this shape, forward-only
and training calls decided apart (config ``kernels.dispatch``).

This folder is installed as ``fasttips.kernels``. Python started in the repository root also sees it
as a top-level ``kernels``, the name of Hugging Face's kernel hub package (which transformers imports).
Imported under that name, this file steps aside for the package that owns it (``_hand_over``).
"""


def _hand_over(name: str, this_file: str) -> None:
    """Replace this module in ``sys.modules`` by the next ``name`` on ``sys.path``, skipping the folder
    that holds this package; ImportError when there is none (as if this folder were not there).

    The import system returns ``sys.modules[name]`` once this file has run, so the caller of
    ``import kernels`` gets the other package. Standard library only: nothing of fasttips is imported
    under the wrong name."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.realpath(os.path.dirname(os.path.dirname(this_file)))
    others = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != here]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"No module named {name!r} outside {here}: that folder's {name}/ is fasttips' own and is "
            f"imported as fasttips.kernels", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


if __name__ == "kernels":   # found as a top-level package because the repository root is on sys.path
    _hand_over(__name__, __file__)
else:
    from ._backend import requested as requested_backend, use_triton
    from .attention.common import cu_seqlens_from_lengths
    from .dispatch.attention import runs_of as segment_runs
    from .ops import attention, attention_varlen, ema_update_, prototype_cross_entropy

    __all__ = ["attention", "attention_varlen", "cu_seqlens_from_lengths", "prototype_cross_entropy",
               "ema_update_", "requested_backend", "segment_runs", "use_triton"]

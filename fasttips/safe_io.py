"""Readers for files that come from elsewhere: data only, never code.

A pickle can run any Python code while it loads, so nothing a user downloads or receives is read with
plain ``pickle``/``torch.load(weights_only=False)``/``np.load(allow_pickle=True)``. Every reader here
uses a format that cannot execute code, and a file that would need unpickling is refused with
:class:`UnsafeFileError`, a one-line message naming the file and saying why.

API (all paths are ``str`` or ``Path``; every error names the file):

``load_npz(path) -> dict[str, np.ndarray]``
    ``.npz`` archives (e.g. released JAX/TIPS weights) through ``np.load(allow_pickle=False)``.
    Arrays of Python objects (dtype ``object``) are pickles inside the archive: refused.
``load_npy(path) -> np.ndarray``
    One ``.npy`` array, same rule.
``load_safetensors(path, device="cpu") -> dict[str, torch.Tensor]``
    Hugging Face / timm ``.safetensors`` (a JSON header and raw tensor bytes). Needs the
    ``safetensors`` package; a clear message says how to install it when it is missing.
``load_torch_weights(path) -> object``
    ``.pt`` / ``.pth`` / ``.bin`` through ``torch.load(weights_only=True)``: tensors and plain
    containers (dict, list, tuple, str, numbers, None) only. Anything else (a class, a function, a
    numpy array) would be unpickled as code: refused, naming what the file asked for.
``load_json(path) -> object``
    JSON, with the file and the line/column of a syntax error in the message.
``load_weights(path)``
    Picks the reader from the file's suffix (``.npz``, ``.npy``, ``.safetensors``, ``.pt``, ``.pth``,
    ``.bin``, ``.json``); ``.pkl``/``.pickle`` and unknown suffixes are refused.
``load_restricted_pickle(path, allowed, what) -> object``
    A plain pickle whose format is fixed by someone else (PyTorch DCP's ``.metadata``) through an
    unpickler that resolves only the globals named in ``allowed`` (``"module.name"`` → the object);
    any other global (``posix.system``, ``builtins.eval``, ...) is refused before it is called.
``unsafe_globals(path) -> list[str]``
    The globals a PyTorch zip file asks for beyond what ``weights_only`` admits (for messages).

``write_atomic(path, data: bytes)``
    The one writer here: the file is written whole or not at all (a temporary file beside it, unique
    per writer, flushed to disk, then renamed over it), so a crash or a second process writing at the
    same time never leaves a part of a file for the readers above.

``UnsafeFileError`` (a ``ValueError``) is raised for files that need pickling; a damaged or
unreadable file raises ``ValueError`` (``UnreadableFileError``) with the file's name and the cause.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["UnsafeFileError", "UnreadableFileError", "load_npz", "load_npy", "load_safetensors",
           "load_torch_weights", "load_json", "load_weights", "load_restricted_pickle", "unsafe_globals",
           "write_atomic"]

_CONVERT = ("convert it to safetensors or .npz (plain arrays) on a machine where you trust the file, "
            "e.g. with safetensors.torch.save_file")


class UnreadableFileError(ValueError):
    """The file is damaged, truncated or not in the format its name says."""


class UnsafeFileError(UnreadableFileError):
    """Loading the file would need unpickling, which can run arbitrary code."""


def load_npz(path) -> dict[str, np.ndarray]:
    path = Path(path)
    out = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                out[key] = _read_array(path, key, lambda: archive[key])
    except (UnsafeFileError, FileNotFoundError):
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UnreadableFileError(f"{path}: not a readable .npz archive ({exc})") from None
    return out


def load_npy(path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return _read_array(path, None, lambda: np.load(path, allow_pickle=False))
    except UnsafeFileError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise UnreadableFileError(f"{path}: not a readable .npy file ({exc})") from None


def _read_array(path: Path, key: str | None, read):
    try:
        return read()
    except ValueError as exc:
        # numpy's words for an object array read without pickling
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            where = f"array {key!r}" if key is not None else "the array"
            raise UnsafeFileError(
                f"{path}: {where} holds Python objects (dtype=object), which only load by unpickling and "
                f"unpickling can run code; refused. Store plain numeric arrays instead") from None
        raise


def load_safetensors(path, device: str = "cpu") -> dict:
    path = Path(path)
    try:
        from safetensors.torch import load_file
        from safetensors import SafetensorError
    except ImportError:
        raise ImportError(f"{path}: reading .safetensors needs the 'safetensors' package: "
                          "pip install safetensors") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UnreadableFileError(f"{path}: not a readable .safetensors file ({exc})") from None


def load_torch_weights(path):
    """``torch.load(weights_only=True)``; a file that needs more than that is refused."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler stops at the first global it does not allow; name it
        wanted = unsafe_globals(path)
        what = f" (it asks for {', '.join(wanted[:5])})" if wanted else ""
        raise UnsafeFileError(
            f"{path}: needs pickled Python objects beyond tensors and plain containers{what}; unpickling "
            f"can run code, so it is refused. If you trust the file, {_CONVERT}") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UnreadableFileError(f"{path}: not a readable PyTorch file ({exc})") from None


def unsafe_globals(path) -> list[str]:
    """``path`` (a file name, or a seekable binary stream at the start of a file)."""
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint
        return list(get_unsafe_globals_in_checkpoint(path if hasattr(path, "read") else str(path)))
    except Exception:                 # old-format (non-zip) files: the generic message is enough
        return []


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``allowed``: the one place where a pickle could name a callable
    (REDUCE, NEWOBJ, BUILD and the extension registry all go through ``find_class``)."""

    def __init__(self, file, allowed: dict, path: Path, what: str):
        super().__init__(file)
        self.allowed, self.path, self.what = allowed, path, what

    def find_class(self, module: str, name: str):
        found = self.allowed.get(f"{module}.{name}")
        if found is None:
            raise UnsafeFileError(f"{self.path}: asks to unpickle {module}.{name}, which {self.what} never "
                                  f"holds; refused (unpickling can run code)")
        return found

    def persistent_load(self, pid):
        raise UnsafeFileError(f"{self.path}: holds a persistent reference, which {self.what} never holds; "
                              "refused")


def load_restricted_pickle(path, allowed: dict, what: str):
    """Unpickle ``path`` admitting only the globals in ``allowed`` ("module.name" → object).

    ``what`` names the file's kind in the messages ("a DCP checkpoint's .metadata"). A refused global
    raises :class:`UnsafeFileError`; a truncated or garbled file :class:`UnreadableFileError`;
    a missing one ``FileNotFoundError``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, allowed, path, what).load()
    except (UnsafeFileError, FileNotFoundError):
        raise
    except Exception as exc:    # a damaged pickle raises whatever its garbled opcodes lead to
        text = str(exc).strip().splitlines()
        raise UnreadableFileError(f"{path}: not a readable pickle ({type(exc).__name__}"
                                  f"{': ' + text[0] if text else ''})") from None


def load_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UnreadableFileError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                                  f"{exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def write_atomic(path, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step (see the module docstring); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        # mkstemp makes the file private (0600): keep the mode of the file it replaces, else rw-r--r--
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_BY_SUFFIX = {".npz": load_npz, ".npy": load_npy, ".safetensors": load_safetensors,
              ".pt": load_torch_weights, ".pth": load_torch_weights, ".bin": load_torch_weights,
              ".json": load_json}


def load_weights(path):
    """Read ``path`` with the safe reader its suffix names; pickles and unknown suffixes are refused."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        raise UnsafeFileError(f"{path}: a Python pickle, which can run code when loaded; refused. "
                              f"If you trust the file, {_CONVERT}")
    reader = _BY_SUFFIX.get(suffix)
    if reader is None:
        raise UnreadableFileError(f"{path}: unknown weight format {suffix or '(no suffix)'!r}; "
                                  f"allowed: {', '.join(sorted(_BY_SUFFIX))}")
    return reader(path)

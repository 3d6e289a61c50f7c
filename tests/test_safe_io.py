"""Files from elsewhere are data: the safe readers load plain weights and refuse anything that would
need unpickling, without ever running the code a crafted file carries."""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
import torch

from fasttips import safe_io
from fasttips.safe_io import UnreadableFileError, UnsafeFileError


class _WritesMarker:
    """Unpickling this runs ``open(marker, 'w')``: the attack a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_plain_npz_npy_json_and_torch_files_load(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)}
    np.savez(tmp_path / "w.npz", **arrays)
    got = safe_io.load_weights(tmp_path / "w.npz")
    assert got.keys() == arrays.keys() and all(np.array_equal(got[k], v) for k, v in arrays.items())
    np.save(tmp_path / "a.npy", arrays["w"])
    assert np.array_equal(safe_io.load_weights(tmp_path / "a.npy"), arrays["w"])
    state = {"layer.weight": torch.randn(3, 2), "meta": {"step": 3, "names": ["a", "b"], "t": (1, 2.5)}}
    torch.save(state, tmp_path / "w.pt")
    loaded = safe_io.load_weights(tmp_path / "w.pt")
    assert torch.equal(loaded["layer.weight"], state["layer.weight"]) and loaded["meta"] == state["meta"]
    (tmp_path / "c.json").write_text('{"a": [1, 2]}')
    assert safe_io.load_weights(tmp_path / "c.json") == {"a": [1, 2]}


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(4, 3), "b": torch.arange(5)}
    st.save_file(tensors, str(tmp_path / "m.safetensors"))
    got = safe_io.load_weights(tmp_path / "m.safetensors")
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UnreadableFileError, match="bad.safetensors"):
        safe_io.load_safetensors(tmp_path / "bad.safetensors")


def test_npz_with_an_object_array_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = _WritesMarker(marker)
    np.savez(tmp_path / "evil.npz", fine=np.zeros(2), evil=payload)     # numpy pickles object arrays
    with zipfile.ZipFile(tmp_path / "evil.npz") as z:                    # the pickle really is inside
        assert any(b"_WritesMarker" in z.read(n) or b"open" in z.read(n) for n in z.namelist())
    with pytest.raises(UnsafeFileError, match=r"evil\.npz.*'evil'.*unpickling can run code"):
        safe_io.load_npz(tmp_path / "evil.npz")
    np.save(tmp_path / "evil.npy", payload, allow_pickle=True)
    with pytest.raises(UnsafeFileError, match="evil.npy"):
        safe_io.load_weights(tmp_path / "evil.npy")
    assert not marker.exists()


def test_pt_whose_unpickling_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "x": _WritesMarker(marker)}, tmp_path / "evil.pt")
    # the file is a working exploit: an unsafe load writes the marker
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeFileError, match=r"evil\.pt: needs pickled Python objects.*open"):
        safe_io.load_torch_weights(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(UnsafeFileError, match="evil.pkl: a Python pickle"):
        safe_io.load_weights(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_damaged_files_name_the_file(tmp_path):
    torch.save({"w": torch.randn(100)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match="w.pt"):
        safe_io.load_torch_weights(tmp_path / "w.pt")
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UnreadableFileError, match="x.npz"):
        safe_io.load_npz(tmp_path / "x.npz")
    (tmp_path / "c.json").write_text('{"a": 1,\n "b": ')
    with pytest.raises(UnreadableFileError, match=r"c.json: not valid JSON \(line 2"):
        safe_io.load_json(tmp_path / "c.json")
    with pytest.raises(UnreadableFileError, match="unknown weight format"):
        safe_io.load_weights(tmp_path / "w.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        safe_io.load_torch_weights(tmp_path / "nope.pt")


def test_a_restricted_pickle_admits_only_the_named_globals(tmp_path):
    from collections import OrderedDict
    allowed = {"collections.OrderedDict": OrderedDict}
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"a": OrderedDict(x=[1, 2.5, "s", None])}))
    assert safe_io.load_restricted_pickle(tmp_path / "ok.pkl", allowed, "a test file") == {"a": OrderedDict(x=[1, 2.5, "s", None])}
    marker = tmp_path / "pwned"
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"a": OrderedDict(x=_WritesMarker(marker))}))
    with pytest.raises(UnsafeFileError, match=r"bad.pkl: asks to unpickle io.open, which a test file never "
                                              r"holds; refused"):
        safe_io.load_restricted_pickle(tmp_path / "bad.pkl", allowed, "a test file")
    assert not marker.exists()
    (tmp_path / "cut.pkl").write_bytes((tmp_path / "ok.pkl").read_bytes()[:-5])
    with pytest.raises(UnreadableFileError, match="cut.pkl: not a readable pickle"):
        safe_io.load_restricted_pickle(tmp_path / "cut.pkl", allowed, "a test file")
    with pytest.raises(FileNotFoundError):
        safe_io.load_restricted_pickle(tmp_path / "none.pkl", allowed, "a test file")

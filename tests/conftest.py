"""Shared fixtures. Tests run on CPU; Triton kernels run under TRITON_INTERPRET=1 (set by .ci/run and
here, before anything imports triton)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite is almost all tiny ops, where a second intra-op thread costs more than it gives.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure) so inputs are drawn anew each time."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s

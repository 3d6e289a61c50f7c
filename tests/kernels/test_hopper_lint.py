"""The performance lint of the Hopper compile gate (tests/tooling/hopper.py): what fails and what it reports.

The gate tests in test_<op>.py run the lint on every kernel and configuration; these tests check the
lint itself on reports with known contents (a ptxas log as ptxas writes it), so a lint that stops
catching serialised wgmma or spills fails here rather than passing silently.
"""
from __future__ import annotations

import pytest

from tooling.hopper import HopperReport, parse_ptxas_log

CLEAN_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'attn_bwd_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for attn_bwd_dkdv_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 560 bytes cmem[0]
"""
SERIALISED = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
              "due to non wgmma instructions defining accumulator registers of a wgmma between start and end of "
              "the pipeline stage in the function 'attn_bwd_dkdv_kernel'")
SPILLING = CLEAN_LOG.replace("0 bytes spill stores, 0 bytes spill loads", "24 bytes spill stores, 16 bytes spill loads")


def report(log=CLEAN_LOG, **fields):
    base = dict(name="k", shared_bytes=64 * 1024, registers=168, local_bytes=0, stack_bytes=0, has_hgmma=True,
                has_wgmma_ptx=True, num_warps=4, hgmma_count=12)
    return HopperReport(**dict(base, **parse_ptxas_log(log), **fields))


def test_a_clean_kernel_passes_and_is_summarised():
    r = report()
    r.check(matmul=True)
    assert r.spill_bytes == 0 and r.ptxas_warnings == ()
    # 168 registers · 32 threads = 5376 per warp (a multiple of 256); 65536 // (5376 · 4) = 3 blocks by
    # registers, 228 KB // 65 KB = 3 by shared memory
    assert r.ctas_per_sm == 3
    assert r.summary() == "k: 168 registers, 65536 B shared, 3 CTAs/SM at 4 warps, 12 HGMMA, spills 0 B"


def test_serialised_wgmma_fails():
    r = report(CLEAN_LOG + SERIALISED + "\n")
    assert r.wgmma_serialised == [SERIALISED.strip()]
    with pytest.raises(AssertionError, match="serialises wgmma.*C7515"):
        r.check(matmul=True)


def test_ptxas_spills_fail_even_when_cuobjdump_shows_none():
    r = report(SPILLING)
    assert r.spill_bytes == 40
    with pytest.raises(AssertionError, match="spill"):
        r.check(matmul=False)


def test_a_matmul_kernel_without_hgmma_fails_and_too_much_shared_memory_fails():
    with pytest.raises(AssertionError, match="no HGMMA"):
        report(has_hgmma=False, hgmma_count=0).check(matmul=True)
    report(has_hgmma=False, hgmma_count=0).check(matmul=False)     # an elementwise kernel needs none
    with pytest.raises(AssertionError, match="shared memory"):
        report(shared_bytes=300 * 1024).check(matmul=True)

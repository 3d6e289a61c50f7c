"""The performance lint of the Hopper compile gate (tests/tooling/hopper.py): what fails and what it reports.

The gate tests in test_<op>.py run the lint on every kernel and configuration; these tests check the
lint itself on reports with known contents (a ptxas log as ptxas writes it), so a lint that stops
catching serialised wgmma or spills fails here rather than passing silently.
"""
from __future__ import annotations

import pytest

from tooling.hopper import Expected, HopperReport, parse_ptxas_log, sass_profile

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


# A loop as cuobjdump prints it: two wgmma groups (the second HGMMA of each closes it with gsb0), four
# exps, then the backward branch; a TMA load and a register split before it.
SASS = """
        /*0000*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8 ;
        /*0010*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0040*/                   MUFU.EX2 R1, R2 ;
        /*0050*/                   MUFU.EX2 R3, R4 ;
        /*0060*/                   MUFU.EX2 R5, R6 ;
        /*0070*/                   MUFU.EX2 R7, R8 ;
        /*0080*/                   HGMMA.64x64x16.F32.BF16 R56, R120, gdesc[UR28].tnspB, R56 ;
        /*0090*/                   HGMMA.64x64x16.F32.BF16 R56, R124, gdesc[UR16].tnspB, R56, gsb0 ;
        /*00a0*/              @!P0 BRA 0x20 ;
        /*00b0*/                   EXIT ;
"""


def sass_report(sass=SASS, **fields):
    counts, loops = sass_profile(sass)
    return report(sass_counts=counts, loops=loops, **fields)


def test_the_sass_profile_counts_gemms_exps_tma_and_warp_specialisation_per_loop_step():
    r = sass_report()
    assert [(lp.hgmma, lp.gemms, lp.ex2, lp.hmma) for lp in r.loops] == [(4, 2, 4, 0)]
    assert r.count("UTMALDG") == 1 and r.count("USETMAXREG") == 1 and r.count("HMMA") == 0
    r.check_expected(Expected(gemms_per_step=2, scores_per_step=4, ex2_per_step=4, tma=True,
                              warp_specialized=True, max_registers=168, min_ctas_per_sm=3))
    assert "main loop: 2 GEMMs (4 HGMMA), 4 EX2 per step; TMA, WS" in r.summary()


@pytest.mark.parametrize("expected, message", [
    (Expected(gemms_per_step=5), "2 GEMMs per main-loop step, expected 5"),
    (Expected(scores_per_step=2, ex2_per_step=2), r"4 EX2 per step for 2 scores per thread \(2.00 per score\)"),
    (Expected(scores_per_step=4, ex2_per_step=4, ex2_duplicated=True), "no longer more than 4"),
    (Expected(max_registers=128), "168 registers > budget 128"),
    (Expected(min_ctas_per_sm=4), "3 CTAs/SM < budget 4"),
    (Expected(mma_sync_ok=True), "no HMMA any more"),
])
def test_each_claim_fails_when_the_sass_does_not_back_it(expected, message):
    with pytest.raises(AssertionError, match=message):
        sass_report().check_expected(expected)


def test_missing_tma_or_register_split_and_any_mma_sync_fail():
    plain = SASS.replace("USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8", "NOP").replace("UTMALDG.2D [UR8], [UR4]", "NOP")
    with pytest.raises(AssertionError, match="claims TMA but has no UTMALDG"):
        sass_report(plain).check_expected(Expected(tma=True))
    with pytest.raises(AssertionError, match="claims warp specialisation but has no USETMAXREG"):
        sass_report(plain).check_expected(Expected(warp_specialized=True))
    mma_sync = SASS.replace("MUFU.EX2 R7, R8", "HMMA.16816.F32.BF16 R8, R4, R12, R8")
    with pytest.raises(AssertionError, match=r"1 HMMA \(mma.sync, not wgmma\)"):
        sass_report(mma_sync).check_expected(Expected())


def test_a_kernel_without_a_tensor_core_loop_is_one_step():
    one_tile = SASS.replace("@!P0 BRA 0x20", "NOP")
    (whole,) = sass_report(one_tile).loops
    assert (whole.hgmma, whole.gemms, whole.ex2) == (4, 2, 4)

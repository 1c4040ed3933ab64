"""bench/kernel_report.py (package bench/sass_report): SASS parsing, loop finding, counting, occupancy, plans, JSON schema."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from sass_report import analyse, cfg, model, parse, plans, render
from sass_report import compile as tools
from sass_report import report as sass_report
from sass_report.specs import KERNEL_NAMES, CudaSpec, Instance


def _line(addr: int, text: str) -> str:
    return (
        f"        /*{addr:04x}*/                   {text} ;   /* 0x0000000000000000 */\n"
        "                                                            /* 0x000fe20000000a00 */"
    )


# A kernel with a prologue, a main loop at 0x0030 (two HMMA) holding an if-block (0x0070) and
# a nested loop (0x00a0..0x00c0), and an epilogue loop without MMA (0x0100..0x0110).
_BODY = [
    (0x00, "S2R R0, SR_TID.X"),
    (0x10, "IMAD.MOV.U32 R1, RZ, RZ, RZ"),
    (0x20, "HMMA.16816.F32 R4, R8, R12, R4"),  # peeled MMA outside the loop
    (0x30, "LDG.E.128 R8, desc[UR4][R2.64]"),  # main loop header
    (0x40, "LDSM.16.M88.4 R12, [R3]"),
    (0x50, "HMMA.16816.F32 R4, R8, R12, R4"),
    (0x60, "@P0 BRA 0x80"),
    (0x70, "STS.U16 [R5], R6"),  # if-block
    (0x80, "HMMA.16816.F32 R16, R8, R12, R16"),
    (0x90, "F2FP.F16.F32.PACK_AB R7, R4, R5"),
    (0xA0, "LOP3.LUT R9, R9, 0xff, RZ, 0xc0, !PT"),  # nested loop header
    (0xB0, "ISETP.GE.AND P1, PT, R9, 0x4, PT"),
    (0xC0, "@!P1 BRA 0xa0"),
    (0xD0, "BAR.SYNC.DEFER_BLOCKING 0x0"),
    (0xE0, "IMAD.IADD R0, R0, 0x1, R1"),  # integer, but on the FMA pipe
    (0xF0, "@P2 BRA 0x30"),
    (0x100, "IADD3 R0, R0, 0x1, RZ"),  # epilogue loop, no MMA
    (0x110, "@P3 BRA 0x100"),
    (0x120, "STG.E.128 desc[UR4][R2.64], R4"),
    (0x130, "EXIT"),
    (0x140, "BRA 0x140"),
]
SASS = (
    "\n\tcode for sm_90a\n\t\tFunction : _Z4testv\n"
    + "\n".join(_line(a, t) for a, t in _BODY)
    + "\n"
)


def test_parse_and_main_loop():
    funcs = parse.parse_sass(SASS)
    assert list(funcs) == ["_Z4testv"]
    instrs = funcs["_Z4testv"]
    assert [i.addr for i in instrs] == [a for a, _ in _BODY]
    assert instrs[6].pred == "@P0" and instrs[6].targets() == [0x80]
    loop = cfg.find_main_loop(instrs)
    assert loop.header == 0x30
    assert [b.addr for b in loop.blocks] == [0x30, 0x70, 0x80, 0xA0, 0xD0]
    assert [lp.header for lp in loop.nested] == [0xA0]
    assert {b.addr: b.depth for b in loop.blocks} == {0x30: 0, 0x70: 0, 0x80: 0, 0xA0: 1, 0xD0: 0}


def test_counts_weighting_and_classes():
    loop = cfg.find_main_loop(parse.parse_sass(SASS)["_Z4testv"])
    default = cfg.count_loop(loop, cfg.block_frequencies(loop))
    assert default.total == 13  # every body block once
    assert default.by_class["mma"] == 2
    assert default.by_class["global_load"] == 1
    assert default.by_class["shared_load"] == 1 and default.by_class["shared_store"] == 1
    assert default.by_class["integer"] == 3  # LOP3, ISETP, IMAD
    assert default.int_pipe == 2  # IMAD issues to the FMA pipe
    assert default.by_class["conversion"] == 1
    assert default.by_class["barrier"] == 1
    assert default.by_class["branch"] == 3
    # LDSM.x4 = 512 bytes per warp, STS.U16 = 64.
    assert default.shared_bytes == 512 + 64
    # The nested loop runs 2.5 times, the if-block a quarter of the iterations.
    w = cfg.block_frequencies(loop, [2.5], {0x70: 0.25})
    c = cfg.count_loop(loop, w)
    assert w == {0x30: 1.0, 0x70: 0.25, 0x80: 1.0, 0xA0: 2.5, 0xD0: 1.0}
    assert c.total == pytest.approx(13 - 0.75 + 1.5 * 3)
    assert c.shared_bytes == pytest.approx(512 + 16)
    with pytest.raises(ValueError, match="not in the main loop"):
        cfg.block_frequencies(loop, None, {0x100: 1.0})


def test_instr_per_element_uses_threads_and_elements():
    instrs = parse.parse_sass(SASS)["_Z4testv"]
    spec = CudaSpec("fake", (), lambda name: None, trip_counts=lambda s, inst: [10 * s])
    inst = Instance("fp16", 16, threads=128, elements=256 * 64)
    r = analyse.analyse(spec, "_Z4testv", "90a", instrs, inst, registers=168, spill=0, smem=69632)
    for s in model.SPARSITIES:
        total = 10 + 3 * 10 * s  # 10 instructions outside the nested loop + 3 per trip
        assert r.instr_per_element[str(s)] == pytest.approx(total * 128 / (256 * 64), abs=1e-3)
    assert r.ctas_per_sm_h100 == 3
    assert r.entry()["arch"] == "sm_90a"


def test_no_mma_loop_is_an_error():
    text = "Function : k\n" + _line(0, "IADD3 R0, R0, 0x1, RZ") + "\n" + _line(0x10, "@P0 BRA 0x0")
    with pytest.raises(ValueError, match="no loop contains an MMA"):
        cfg.find_main_loop(parse.parse_sass(text)["k"])


@pytest.mark.parametrize(
    ("regs", "smem", "threads", "expected"),
    [
        (168, 69632, 128, 3),  # registers: 12 warps; shared memory: 3 CTAs
        (255, 0, 256, 1),  # 256 regs/thread x 8 warps = the whole register file
        (32, 0, 128, 16),  # warps: 64 / 4
        (16, 0, 32, 32),  # the CTA limit
        (64, 200 * 1024, 128, 1),
        (64, 228 * 1024, 128, 0),  # more than a CTA may have
    ],
)
def test_ctas_per_sm(regs, smem, threads, expected):
    assert model.ctas_per_sm(regs, smem, threads) == expected


def test_shared_bytes_and_classes():
    assert parse.shared_bytes("LDSM.16.M88.4") == 512
    assert parse.shared_bytes("LDSM.16.M88.2") == 256
    assert parse.shared_bytes("STS.128") == 512
    assert parse.shared_bytes("LDS.U16") == 64
    assert parse.shared_bytes("LDG.E.128") == 0
    assert parse.classify("IMAD.WIDE.U32") == "integer"
    assert parse.classify("HGMMA.64x16x16.F32") == "mma"
    assert parse.classify("LDGSTS.E.BYPASS.128") == "global_load"
    assert parse.classify("UIADD3") == "other"


def test_ptxas_and_res_usage_parsing():
    log = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 2048 bytes smem\n"
    )
    assert parse.parse_ptxas(log) == {
        "_Z1kv": {"registers": 96, "spill_bytes": 12, "static_smem": 2048}
    }
    res = " Function _Z1kv:\n  REG:118 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:624 TEXTURE:0\n"
    assert parse.parse_res_usage(res) == {
        "_Z1kv": {"registers": 118, "stack": 0, "shared": 1024, "local": 0}
    }


def _fake_result(
    kernel: str,
    n_tile: int,
    ctas: int = 2,
    ipe: float = 4.0,
    *,
    arch: str = "sm_90a",
    registers: int = 128,
    smem: int = 40000,
) -> analyse.KernelResult:
    keys = [str(s) for s in model.SPARSITIES]
    detail = {
        "integer_per_element": dict.fromkeys(keys, 1.0),
        "int_pipe_per_element": dict.fromkeys(keys, 1.0),
        "smem_bytes_per_element": dict.fromkeys(keys, 0.5),
    }
    return analyse.KernelResult(
        kernel, arch, "fp16", n_tile, registers, 0, smem, ctas, dict.fromkeys(keys, ipe), detail
    )


def test_report_schema_plans_and_missing_spec(monkeypatch, tmp_path):
    fakes = {
        "tiled_csl_cuda": [_fake_result("tiled_csl_cuda", n) for n in (8, 16, 32)],
        "bitmap_triton": [_fake_result("bitmap_triton", n, 4) for n in (16, 32)],
    }

    def load_spec(name):
        if name == "bitmap_cuda":
            raise ImportError("missing for this test")
        return CudaSpec(name, (), lambda n: None)

    monkeypatch.setattr(analyse, "load_spec", load_spec)
    monkeypatch.setattr(analyse, "report_cuda", lambda spec, log, jobs=2: fakes[spec.name])
    report, log = sass_report.build_report(KERNEL_NAMES, plans=True)
    assert any(line.startswith("ERROR bitmap_cuda: no spec") for line in log)
    assert {e["kernel"] for e in report["kernels"]} == {"tiled_csl_cuda", "bitmap_triton"}
    for e in report["kernels"]:
        assert set(e) >= {
            "kernel",
            "arch",
            "dtype",
            "n_tile",
            "registers",
            "spill_bytes",
            "smem_bytes",
            "ctas_per_sm_h100",
            "instr_per_element",
        }
        assert set(e["instr_per_element"]) == {"0.5", "0.7", "0.9"}
    plan_keys = {"kernel", "arch", "gpu", "m", "k", "n", "sparsity", "ctas", "split_k"}
    plan_keys |= {"persistent", "smem_bytes", "smem_limit"}
    per_kernel = len(model.SHAPES) * len(model.NS) * len(model.SPARSITIES)
    for name in ("tiled_csl_cuda", "bitmap_triton"):
        for arch, gpu in (("sm_90a", "H100 SXM"), ("sm_86", "A10"), ("sm_80", "A100 SXM")):
            rows = [p for p in report["plans"] if p["kernel"] == name and p["arch"] == arch]
            assert len(rows) == per_kernel
            assert all(set(p) >= plan_keys and p["gpu"] == gpu for p in rows)
    # smem_bytes: the launched instance's (counted for sm_90a here), else unknown
    tcsl_rows = [p for p in report["plans"] if p["kernel"] == "tiled_csl_cuda"]
    assert {p["smem_bytes"] for p in tcsl_rows if p["arch"] == "sm_90a"} == {40000}
    assert {p["smem_bytes"] for p in tcsl_rows if p["arch"] != "sm_90a"} == {None}
    assert {p["smem_limit"] for p in tcsl_rows if p["arch"] == "sm_86"} == {101_376}
    # The Triton plan is choose_config's: CTAs = M blocks x N blocks x split.
    from flashsparse.kernels.triton.bitmap_spmm import choose_config

    row = next(
        p
        for p in report["plans"]
        if p["kernel"] == "bitmap_triton" and p["m"] == 4096 and p["n"] == 16
    )
    cfg = choose_config(4096, row["k"], 16, 132)
    assert row["ctas"] == -(-4096 // cfg.block_m) * cfg.split_k and row["split_k"] == cfg.split_k
    # The Tiled-CSL plan is the provider's own.
    from flashsparse.kernels.cuda import tiled_csl

    row = next(
        p
        for p in report["plans"]
        if p["kernel"] == "tiled_csl_cuda" and p["m"] == 28672 and p["n"] == 8
    )
    tile_m, _ = tiled_csl.tile_config(8)
    assert row["ctas"] == -(-28672 // tile_m) * row["split_k"]
    preds = report["predictions"]
    # One prediction per sm_90 plan row (a kernel whose spec is missing still has its plan,
    # predicted from bytes alone).
    sm90 = [p for p in report["plans"] if p["arch"].startswith("sm_90")]
    assert len(preds) == len(sm90) and all(p["speedup"] > 0 for p in preds)
    text = render.format_report(report)
    assert "ERROR bitmap_cuda" in text
    assert "tiled_csl_cuda  sm_86   A10" in text  # the per-arch plan summary
    # Red flag on plans under two CTAs per SM.
    small = [p for p in sm90 if p["ctas"] < 264]
    assert small and "!" in text
    out = tmp_path / "r.json"
    out.write_text(json.dumps(report))
    assert set(json.loads(out.read_text())) >= {"kernels", "plans"}


def test_predict_model_is_memory_bound_when_instructions_are_cheap():
    plan = {"ctas": 1000, "split_k": 1, "persistent": False}
    r = _fake_result("bitmap_cuda", 16, ctas=2, ipe=0.01)
    p = model.predict("bitmap_cuda", 8192, 8192, 16, 0.9, plan, r)
    assert p["bound"] == "memory"
    m = k = 8192
    dense = (2 * m * k + 2 * 16 * (m + k)) / model.H100.bandwidth + model.H100.launch_s
    sparse = (
        model.weight_bytes("bitmap_cuda", m, k, 0.9) + 2 * 16 * (m + k)
    ) / model.H100.bandwidth + model.H100.launch_s
    assert p["speedup"] == pytest.approx(dense / sparse, rel=1e-2)
    slow = model.predict(
        "bitmap_cuda", m, k, 16, 0.9, plan, _fake_result("bitmap_cuda", 16, ipe=40.0)
    )
    assert slow["bound"] == "issue" and slow["speedup"] < p["speedup"]


def test_cli_rejects_unknown_kernel():
    with pytest.raises(SystemExit):
        sass_report.main(["--kernels", "nope"])


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None or tools.find_tool("cuobjdump") is None,
    reason="needs nvcc and cuobjdump",
)
def test_real_compile_tiled_csl():
    report, log = sass_report.build_report(["tiled_csl_cuda"], plans=False)
    assert not [line for line in log if line.startswith("ERROR")], log
    rows = [e for e in report["kernels"] if e["arch"] == "sm_90a" and e["dtype"] == "fp16"]
    assert sorted(e["n_tile"] for e in rows) == [8, 16, 32, 64, 128]
    for e in rows:
        assert e["registers"] > 0 and e["spill_bytes"] == 0 and e["ctas_per_sm_h100"] >= 1
        ipe = e["instr_per_element"]
        # Fewer nonzeros, fewer words to load and scatter.
        assert 0 < ipe["0.9"] < ipe["0.7"] < ipe["0.5"]


def test_without_nvcc_the_cuda_kernels_are_skipped(monkeypatch):
    monkeypatch.setattr(tools, "find_tool", lambda name: None)
    spec = analyse.load_spec("tiled_csl_cuda")
    log: list[str] = []
    assert analyse.report_cuda(spec, log) == []
    assert log == ["SKIP tiled_csl_cuda: nvcc not found"]
    report, log = sass_report.build_report(["tiled_csl_cuda"], plans=True)
    assert report["kernels"] == [] and report["plans"]  # plans need no compiler
    assert all(not p["counted"] for p in report["predictions"])


def test_plan_functions_get_the_device_and_the_counted_occupancy(monkeypatch):
    from flashsparse.kernels.cuda import bitmap

    calls = []

    def bitmap_launch_plan(m, k, n, *, device, ctas_per_sm=None):
        calls.append((m, k, n, device, ctas_per_sm))
        return {"ctas": 300, "split_k": 2, "persistent": False, "tile_m": 64, "tile_n": 16}

    monkeypatch.setattr(bitmap, "bitmap_launch_plan", bitmap_launch_plan)
    results = [_fake_result("bitmap_cuda", n, ctas=3) for n in (8, 16, 32)]
    plan = plans.plan_for("bitmap_cuda", 4096, 4096, 8, 0.7, results)
    assert plan["ctas"] == 300 and plan["split_k"] == 2 and plan["workspace"] is True
    assert plan["smem_bytes"] == 40000  # the 16-wide instance's static + dynamic bytes
    (_, _, _, device, per_sm), *_ = calls
    # the H100's limits, and CTAs per SM from the counted instances (128 registers: 4 CTAs)
    assert (device.sms, device.smem_per_block_optin) == (132, 227 * 1024)
    assert per_sm == {8: 4, 16: 4, 32: 4}
    # sm_86: an A10's limits; no sm_86 instance was counted, so the planner's own model
    calls.clear()
    plan = plans.plan_for("bitmap_cuda", 4096, 4096, 8, 0.7, results, arch="86")
    (_, _, _, device, per_sm), *_ = calls
    assert (device.sms, device.smem_per_block_optin, per_sm) == (72, 99 * 1024, None)
    assert plan["smem_bytes"] is None


def _bitmap_results(arch: str, static_smem: int) -> list[analyse.KernelResult]:
    """Counted bitmap instances as ptxas reports them for ``arch`` (registers, static smem)."""
    from sass_report.specs import bitmap_cuda as spec

    regs = {8: 79, 16: 106, 32: 157}
    out = []
    for tn in (8, 16, 32):
        r = _fake_result(
            "bitmap_cuda", tn, arch=arch, registers=regs[tn], smem=spec.smem_bytes(tn) + static_smem
        )
        r.ctas_per_sm = model.ctas_per_sm(r.registers, r.smem_bytes, 128, model.gpu_for_arch(arch))
        out.append(r)
    return out


def test_sm86_plans_never_exceed_its_shared_memory(monkeypatch):
    """With the real per-CTA footprint (4,112 B static + dynamic), every sm_86 plan launches a
    tile width whose CTA fits 101,376 bytes: N > 16 runs 16-wide tiles."""
    results = _bitmap_results("sm_86", 4112) + _bitmap_results("sm_80", 4112)
    monkeypatch.setattr(analyse, "load_spec", lambda name: CudaSpec(name, (), lambda n: None))
    monkeypatch.setattr(analyse, "report_cuda", lambda spec, log, jobs=2: results)
    report, log = sass_report.build_report(["bitmap_cuda"], plans=True)
    assert not [line for line in log if line.startswith("ERROR")], log
    rows = [p for p in report["plans"] if p["arch"] == "sm_86"]
    assert rows and all(p["smem_bytes"] <= 101_376 == p["smem_limit"] for p in rows)
    assert {p["tile_n"] for p in rows if p["n"] == 32} == {16}
    a100 = [p for p in report["plans"] if p["arch"] == "sm_80"]
    assert {p["tile_n"] for p in a100 if p["n"] == 32} == {32}
    assert all(p["smem_bytes"] <= p["smem_limit"] for p in a100)
    kernels = {(e["arch"], e["n_tile"]): e for e in report["kernels"]}
    assert kernels[("sm_86", 32)]["ctas_per_sm"] == 0 and kernels[("sm_86", 16)]["ctas_per_sm"] == 1


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None or tools.find_tool("cuobjdump") is None,
    reason="needs nvcc and cuobjdump",
)
def test_real_compile_sm86_plans_fit(monkeypatch):
    """The compiled sm_86 cubins' own static shared memory: no sm_86 plan over 101,376 B."""
    spec = analyse.load_spec("bitmap_cuda")
    monkeypatch.setattr(analyse, "load_spec", lambda name: dataclasses.replace(spec, archs=("86",)))
    report, log = sass_report.build_report(["bitmap_cuda"], plans=True)
    assert not [line for line in log if line.startswith("ERROR")], log
    rows = report["plans"]
    assert len(rows) == len(model.SHAPES) * len(model.NS) * len(model.SPARSITIES)
    assert all(p["arch"] == "sm_86" and p["smem_bytes"] <= 101_376 for p in rows)
    wide = [e for e in report["kernels"] if e["n_tile"] == 32]
    assert wide and all(e["smem_bytes"] > 101_376 and e["ctas_per_sm"] == 0 for e in wide)


def test_non_primary_variants_are_reported_but_not_planned():
    primary = _fake_result("bitmap_cuda", 16, ctas=3)
    primary.instance = Instance("fp16", 16, 128, 4096)
    variant = _fake_result("bitmap_cuda", 16, ctas=1, ipe=99.0)
    variant.instance = Instance("fp16", 16, 128, 4096, params={"x_aligned": False}, primary=False)
    assert plans.pick_instance([variant, primary], "bitmap_cuda", 16) is primary
    assert plans._arch_instances([variant, primary], "bitmap_cuda", "90a") == {16: primary}

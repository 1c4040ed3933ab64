"""The torch-free C++ harness (tests/cpu_harness/bitmap_harness.cpp) over every CPU kernel path.

Natively it checks the paths this machine runs (scalar, AVX2, AVX-512 on x86). Where the
Debian packages g++-aarch64-linux-gnu and qemu-user are installed it is also cross-compiled for
aarch64 and run under qemu-aarch64 with CPU models that have and lack FEAT_FP16/FHM/BF16, so
every NEON variant and every branch of the feature detection runs without ARM hardware. On an
x86 host, qemu-x86_64 (same package) runs the native harness as x86 CPUs that lack AVX, AVX2
or AVX-512 (a Westmere to an AVX2-only Zen 3): each path must be found exactly where the CPU
has it, and no AVX code may run where it does not. The harness compiles the same kernel sources
the extension does for that architecture (flashsparse.kernels.build: sources named for an ISA
only on its architecture).

Built with -fsanitize=address (where the compiler has it) run: the bitmap harness,
tests/cpu_harness/quant_harness.cpp over every quantized entry point on weights encoded here,
and tests/cpu_harness/sddmm_harness.cpp over the weight-gradient kernels (and the bitmap one
cross-built for aarch64, under qemu), each input in a heap block of exactly its size, so that a read past one is reported where it happens (until
2026-12-04 the group-32 quantized kernels read one scale past each row's).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from flashsparse.kernels import build
from flashsparse.kernels.cpu import bitmap as cpu_kernels

QUANT_HARNESS = Path(__file__).resolve().parent / "cpu_harness" / "quant_harness.cpp"
SDDMM_HARNESS = Path(__file__).resolve().parent / "cpu_harness" / "sddmm_harness.cpp"
ASAN = ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "cpu_harness" / "bitmap_harness.cpp"
CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
# qemu 7.2 CPU models, the features the harness must detect under each, and whether the whole
# harness runs (cortex-a76 runs the same code as cortex-a57: its smaller shapes suffice).
QEMU_MODELS = {
    "max": ("fp16=1,fhm=1,bf16=1", True),
    "cortex-a76": ("fp16=1,fhm=0,bf16=0", False),
    "cortex-a57": ("fp16=0,fhm=0,bf16=0", True),
}


def _kernel_sources(machine: str) -> list[str]:
    sources = cpu_kernels.EXTENSION.sources(machine=machine)
    return [str(p) for p in sources if p.parent.name == "cpu"]  # no torch glue


def _compile(cxx: str, machine: str, out: Path, extra: tuple[str, ...] = ()) -> None:
    cmd = [
        cxx,
        "-std=c++17",
        "-O2",
        f"-I{build.CSRC}",
        str(HARNESS),
        *_kernel_sources(machine),
        *extra,
        "-o",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0, output
    last = done.stdout.strip().splitlines()[-1]  # stderr may end with qemu's warnings
    assert last.endswith(" 0 failed") and not last.startswith("0 passed"), last
    return output


# qemu 7.2 x86 CPU models (TCG runs AVX2, FMA, F16C and BMI2 but no AVX-512) and the paths
# the harness must find under each.
QEMU_X86_MODELS = {
    "Westmere": "avx2=0,avx512=0",  # SSE4.2, no AVX
    "SandyBridge": "avx2=0,avx512=0",  # AVX without AVX2 / FMA / F16C
    "Haswell-noTSX": "avx2=1,avx512=0",
    "EPYC-Milan": "avx2=1,avx512=0",  # Zen 3
}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cpu_harness")


@pytest.fixture(scope="module")
def native_harness(workdir) -> Path:
    cxx = build.find_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (c++ or $CXX) to build the harness")
    exe = workdir / "bitmap_harness_native"
    _compile(cxx, platform.machine(), exe)
    return exe


@pytest.mark.slow
def test_native_harness(native_harness):
    output = _run([str(native_harness)])
    assert "PASS scalar" in output
    if _is_x86():
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if " avx2 " in flags and " f16c " in flags and " fma " in flags and " bmi2 " in flags:
            assert "PASS avx2" in output
        if all(f" {f} " in flags for f in ("avx512f", "avx512bw", "avx512_vbmi2", "avx512_bf16")):
            assert "PASS avx512" in output


@pytest.mark.slow
@pytest.mark.parametrize("model", list(QEMU_X86_MODELS))
def test_x86_harness_under_qemu(native_harness, model):
    if not _is_x86():
        pytest.skip("x86 CPU models: this host is not x86_64")
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 is not installed (Debian package qemu-user)")
    expect = QEMU_X86_MODELS[model]
    output = _run(
        ["qemu-x86_64", "-cpu", model, str(native_harness), "--expect", expect, "--quick"]
    )
    assert "PASS scalar" in output
    assert ("PASS avx2" in output) == ("avx2=1" in expect), output
    assert "avx512 " not in output, output


def _cxx_with_asan(workdir: Path) -> str:
    cxx = build.find_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (c++ or $CXX) to build the harness")
    probe = workdir / "asan_probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    done = subprocess.run(
        [cxx, *ASAN, str(probe), "-o", str(workdir / "asan_probe")], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"{cxx} cannot build with -fsanitize=address (libasan missing?): {done.stderr[-300:]}"
        )
    return cxx


def _run_sanitized(cmd: list[str]) -> str:
    output = _run(cmd)
    assert "AddressSanitizer" not in output, output
    return output


@pytest.mark.slow
def test_native_harness_under_address_sanitizer(workdir):
    cxx = _cxx_with_asan(workdir)
    exe = workdir / "bitmap_harness_asan"
    _compile(cxx, platform.machine(), exe, ASAN)
    assert "PASS scalar" in _run_sanitized([str(exe), "--quick"])


def _write_quant_cases(folder: Path) -> int:
    """Weights encoded by flashsparse for quant_harness.cpp: k on both sides of the tile and
    half-tile edges (k mod 64 = 0, 1, 8, 32, 33), every scale layout, int8 and fp8, skewed masks."""
    import torch
    from helpers import random_weight

    from flashsparse.formats.bitmap_quant import QuantBitmap

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    shapes = [(70, 200), (1, 1), (65, 33), (130, 96), (64, 64), (3, 129), (129, 2113)]
    kinds = [("uniform", 0.5), ("row_skewed", 0.85), ("dense_tiles", 0.7), ("empty_tiles", 0.95)]
    for i, ((m, k), (kind, sparsity)) in enumerate((s, kd) for s in shapes for kd in kinds):
        w = random_weight(m, k, sparsity, torch.float32, kind, seed=i)
        for quant in ("int8", "fp8"):
            for group in (None, 32, 64, 128):
                if group is not None and group != 32 and group >= k:
                    continue
                sw = QuantBitmap.encode(w, quant, group)
                masks, values, offsets, scales = sw.tensors
                dense = QuantBitmap.decode_reference(*sw.tensors, m=m, k=k, dtype=torch.float64)
                name = f"c{len(lines)}"
                arrays = {
                    "masks": masks,
                    "values": values.view(torch.uint8),
                    "offsets": offsets,
                    "scales": scales.float(),
                    "dense": dense,
                }
                for ext, t in arrays.items():
                    (folder / f"{name}.{ext}").write_bytes(t.contiguous().numpy().tobytes())
                lines.append(f"{name} {m} {k} {scales.shape[1]} {group or k} {int(quant == 'fp8')}")
    (folder / "manifest.txt").write_text("\n".join(lines) + "\n")
    return len(lines)


@pytest.mark.slow
def test_quantized_kernels_under_address_sanitizer(workdir):
    cxx = _cxx_with_asan(workdir)
    folder = workdir / "quant_cases"
    cases = _write_quant_cases(folder)
    exe = workdir / "quant_harness_asan"
    _build_sanitized(cxx, QUANT_HARNESS, exe)
    output = _run_sanitized([str(exe), str(folder)])
    passed = int(output.strip().splitlines()[-1].split()[0])
    assert passed >= cases * 8, output  # every case: >= 7 kernel runs and a decode


def _build_sanitized(cxx: str, harness: Path, exe: Path) -> None:
    sources = [str(harness), *_kernel_sources(platform.machine())]
    cmd = [cxx, "-std=c++17", "-O1", *ASAN, f"-I{build.CSRC}", *sources, "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"


@pytest.mark.slow
def test_sddmm_kernels_under_address_sanitizer(workdir):
    cxx = _cxx_with_asan(workdir)
    exe = workdir / "sddmm_harness_asan"
    _build_sanitized(cxx, SDDMM_HARNESS, exe)
    output = _run_sanitized([str(exe)])
    assert int(output.strip().splitlines()[-1].split()[0]) >= 3 * 5 * 5 * 3, output


@pytest.fixture(scope="module")
def arm_harness(workdir) -> Path:
    missing = [
        f"{tool} (Debian package {pkg})"
        for tool, pkg in ((CROSS_CXX, "g++-aarch64-linux-gnu"), (QEMU, "qemu-user"))
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.skip(
            "the aarch64 harness needs "
            + " and ".join(missing)
            + ": apt-get install g++-aarch64-linux-gnu qemu-user"
        )
    exe = workdir / "bitmap_harness_aarch64"
    _compile(CROSS_CXX, "aarch64", exe, ("-static",))
    return exe


@pytest.mark.slow
@pytest.mark.parametrize("model", list(QEMU_MODELS))
def test_aarch64_harness_under_qemu(arm_harness, model):
    features, whole = QEMU_MODELS[model]
    quick = [] if whole else ["--quick"]
    output = _run([QEMU, "-cpu", model, str(arm_harness), "--expect", features, *quick])
    assert "PASS neon " in output and "PASS neon/gather" in output and "PASS neon/rebuild" in output
    if "bf16=1" in features:
        assert "PASS neon/gather+bfdot" in output and "PASS neon/rebuild+fmlal" in output


def test_sources_follow_the_architecture():
    x86 = {Path(p).name for p in _kernel_sources("x86_64")}
    arm = {Path(p).name for p in _kernel_sources("aarch64")}
    assert {"bitmap_avx2.cpp", "bitmap_avx512.cpp"} <= x86 and "bitmap_neon.cpp" not in x86
    assert "bitmap_neon.cpp" in arm and not arm & {"bitmap_avx2.cpp", "bitmap_avx512.cpp"}
    assert {"bitmap_scalar.cpp", "bitmap_isa_stubs.cpp"} <= x86 & arm


@pytest.mark.slow
def test_aarch64_harness_under_address_sanitizer(workdir):
    """The NEON kernels under AddressSanitizer, cross-built and run under qemu-aarch64 (ASan
    cannot link statically: the Debian cross sysroot provides the libraries)."""
    sysroot = Path("/usr/aarch64-linux-gnu")
    if shutil.which(CROSS_CXX) is None or shutil.which(QEMU) is None or not sysroot.is_dir():
        pytest.skip(f"needs {CROSS_CXX}, {QEMU} and the cross sysroot {sysroot}")
    exe = workdir / "bitmap_harness_aarch64_asan"
    try:
        _compile(CROSS_CXX, "aarch64", exe, ASAN)
    except AssertionError as exc:
        if "asan" in str(exc).lower():
            pytest.skip(
                f"{CROSS_CXX} cannot build with -fsanitize=address (libasan for arm64 missing)"
            )
        raise
    # LeakSanitizer needs ptrace, which qemu-user does not offer
    cmd = [
        "env",
        "ASAN_OPTIONS=detect_leaks=0",
        QEMU,
        "-L",
        str(sysroot),
        "-cpu",
        "max",
        str(exe),
        "--quick",
    ]
    assert "PASS neon/gather+bfdot" in _run_sanitized(cmd)


@pytest.mark.slow
def test_aarch64_extension_links_without_x86_sources(tmp_path):
    """Every source of the CPU extension for aarch64, the torch glue included (torch's headers
    are the same on both architectures), cross-compiles, and together they leave no flashsparse
    function undefined: an entry point the glue calls but whose ISA file is not built there
    (an AVX kernel, say) must have a stub, or the extension would not load on ARM."""
    if shutil.which(CROSS_CXX) is None or shutil.which("aarch64-linux-gnu-ld") is None:
        pytest.skip(f"{CROSS_CXX} is not installed (Debian package g++-aarch64-linux-gnu)")
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{build.CSRC}", f"-I{sysconfig.get_path('include')}"]
    includes += [f"-I{p}" for p in include_paths()]
    objects = []
    for source in cpu_kernels.EXTENSION.sources(machine="aarch64"):
        obj = tmp_path / f"{source.name}.o"
        cmd = [
            CROSS_CXX,
            "-std=c++17",
            "-O0",
            "-fPIC",
            *includes,
            "-c",
            str(source),
            "-o",
            str(obj),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{source.name}:\n{done.stderr[-3000:]}"
        objects.append(str(obj))
    combined = tmp_path / "all.o"
    subprocess.run(["aarch64-linux-gnu-ld", "-r", *objects, "-o", str(combined)], check=True)
    undefined = subprocess.run(
        ["aarch64-linux-gnu-nm", "-C", "-u", str(combined)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    missing = [ln.strip() for ln in undefined.splitlines() if "flashsparse::" in ln]
    assert not missing, f"undefined on aarch64: {missing}"

"""The GPU model behind the predictions: occupancy limits per architecture, the benchmark
shapes, and a time/speed-up estimate from bytes, issued instructions and shared-memory traffic.

Predictions use the H100 (or H200) model. Launch plans are also made for one named GPU per
other compiled architecture (:data:`ARCH_GPUS`: sm_80 an A100, sm_86 an A10 -- the 99 KiB of
shared memory per block that sm_86, sm_89 and sm_120 share), so the report shows that every
plan fits its architecture's limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .analyse import KernelResult

SPARSITIES = (0.5, 0.7, 0.9)
NS = (1, 8, 16, 32)
SHAPES: tuple[tuple[str, int, int], ...] = (
    ("llama3-8b", 6144, 4096),
    ("llama3-8b", 4096, 4096),
    ("llama3-8b", 28672, 4096),
    ("llama3-8b", 4096, 14336),
    ("opt-66b", 27648, 9216),
    ("opt-66b", 9216, 9216),
    ("opt-66b", 36864, 9216),
    ("opt-66b", 9216, 36864),
)


@dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM"
    sms: int = 132
    clock_hz: float = 1.75e9
    schedulers: int = 4
    bandwidth: float = 3.35e12  # bytes/s
    smem_bytes_per_clk: int = 128  # per SM
    launch_s: float = 2e-6
    max_warps: int = 64
    max_ctas: int = 32
    regs: int = 65536
    smem: int = 228 * 1024
    smem_reserved: int = 1024  # per CTA
    max_smem_per_cta: int = 227 * 1024

    @property
    def issue_rate(self) -> float:
        """Thread-instructions per second over the whole GPU."""
        return self.sms * self.schedulers * 32 * self.clock_hz


H100 = Gpu()
# Same SMs, clocks and occupancy limits as the H100; more bandwidth (the lent GPU is often one).
H200 = Gpu(name="H200", bandwidth=4.8e12)
GPUS = {"h100": H100, "h200": H200}
# Launch-plan targets of the other architectures (limits from the CUDA programming guide).
A100 = Gpu(
    name="A100 SXM",
    sms=108,
    clock_hz=1.41e9,
    bandwidth=2.04e12,
    smem=164 * 1024,
    max_smem_per_cta=163 * 1024,
)
A10 = Gpu(
    name="A10",
    sms=72,
    clock_hz=1.695e9,
    bandwidth=0.6e12,
    max_warps=48,
    max_ctas=16,
    smem=100 * 1024,
    max_smem_per_cta=99 * 1024,
)
ARCH_GPUS = {"80": A100, "86": A10, "90": H100, "90a": H100}


def gpu_for_arch(arch: str, model: Gpu = H100) -> Gpu:
    """The GPU plans for ``arch`` (``"86"`` or ``"sm_86"``) target: ``model`` for sm_90."""
    arch = arch.removeprefix("sm_")
    if arch.startswith("90"):
        return model
    if arch not in ARCH_GPUS:
        raise ValueError(f"no GPU model for arch sm_{arch}; known: {sorted(ARCH_GPUS)}")
    return ARCH_GPUS[arch]


def ctas_per_sm(registers: int, smem_bytes: int, threads: int, gpu: Gpu = H100) -> int:
    """Resident CTAs per SM (the CUDA occupancy calculator's limits); 0 when ``smem_bytes``
    (static + dynamic per CTA) exceeds what one CTA may have on ``gpu``."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    warps = -(-threads // 32)
    limits = [gpu.max_ctas, gpu.max_warps // warps]
    if registers > 0:
        per_warp = -(-registers * 32 // 256) * 256
        limits.append((gpu.regs // per_warp) // warps)
    if smem_bytes > gpu.max_smem_per_cta:
        return 0
    limits.append(gpu.smem // (smem_bytes + gpu.smem_reserved))
    return max(0, min(limits))


def weight_bytes(kernel: str, m: int, k: int, s: float) -> float:
    """Stored weight bytes for a 16-bit weight at sparsity ``s`` (uniform random mask)."""
    tiles64 = -(-m // 64) * -(-k // 64)
    if kernel.startswith("bitmap"):
        # values (each tile padded to 8) + 64-bit row masks + int32 tile offsets
        return 2 * (1 - s) * m * k + tiles64 * (8 + 512 + 4)
    tiles128 = -(-m // 128) * -(-k // 64)
    return 4 * (1 - s) * m * k + tiles128 * (4 * 2 + 4)


def predict(
    kernel: str,
    m: int,
    k: int,
    n: int,
    s: float,
    plan: Mapping[str, Any],
    result: KernelResult | None,
    gpu: Gpu = H100,
) -> dict[str, float]:
    """Model time and speed-up over dense (see the module docstring)."""
    key = str(s)
    x_y = 2 * n * k + 2 * n * m
    split = int(plan.get("split_k", 1))
    ws = 8 * n * m * split if plan.get("workspace") and split > 1 else 0
    nbytes = weight_bytes(kernel, m, k, s) + x_y + ws
    t_mem = nbytes / gpu.bandwidth
    t_issue = t_smem = 0.0
    if result is not None:
        ctas = int(plan["ctas"])
        slots = gpu.sms * max(1, result.ctas_per_sm_h100)
        util = (
            min(ctas, gpu.sms) / gpu.sms if ctas <= gpu.sms else ctas / (-(-ctas // slots) * slots)
        )
        passes = m * k * -(-n // result.n_tile)  # weight elements decoded (once per N block)
        ipe = max(result.instr_per_element[key], 2 * result.detail["int_pipe_per_element"][key])
        t_issue = ipe * passes / (gpu.issue_rate * util)
        sbpe = result.detail["smem_bytes_per_element"][key]
        t_smem = sbpe * passes / (gpu.sms * gpu.smem_bytes_per_clk * gpu.clock_hz * util)
    t = max(t_mem, t_issue, t_smem) + gpu.launch_s * (1 + int(plan.get("extra_launches", 0)))
    dense = (2 * m * k + x_y) / gpu.bandwidth + gpu.launch_s
    bound = max(("memory", t_mem), ("issue", t_issue), ("shared", t_smem), key=lambda p: p[1])[0]
    return {
        "time_us": round(t * 1e6, 2),
        "dense_us": round(dense * 1e6, 2),
        "speedup": round(dense / t, 3),
        "bound": bound,
    }

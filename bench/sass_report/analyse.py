"""Per-kernel analysis: compile every instantiation a spec names, find its main loop and
count instructions per weight element at each sparsity."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import compile as tools
from .cfg import block_frequencies, count_loop, find_main_loop
from .model import H100, SPARSITIES, Gpu, ctas_per_sm, gpu_for_arch
from .parse import Instr, parse_ptxas, parse_res_usage, parse_sass
from .specs import CudaSpec, Instance, TritonSpec

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class KernelResult:
    kernel: str
    arch: str
    dtype: str
    n_tile: int
    registers: int
    spill_bytes: int
    smem_bytes: int  # static (from ptxas) + dynamic (from the spec) per CTA
    ctas_per_sm_h100: int
    instr_per_element: dict[str, float]
    detail: dict[str, Any]
    function: str = ""
    instance: Instance | None = None
    # On the arch's own plan target (gpu_for_arch): 0 = does not fit it.
    ctas_per_sm: int | None = None

    def entry(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "arch": self.arch,
            "dtype": self.dtype,
            "n_tile": self.n_tile,
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "smem_bytes": self.smem_bytes,
            "ctas_per_sm_h100": self.ctas_per_sm_h100,
            "ctas_per_sm": self.ctas_per_sm_h100 if self.ctas_per_sm is None else self.ctas_per_sm,
            "ctas_per_sm_gpu": gpu_for_arch(self.arch).name,
            "instr_per_element": self.instr_per_element,
            "detail": self.detail,
        }


def analyse(
    spec: Any,
    name: str,
    arch: str,
    instrs: Sequence[Instr],
    inst: Instance,
    registers: int,
    spill: int,
    smem: int,
    gpu: Gpu = H100,
) -> KernelResult:
    """Count one instantiation's main loop at every sparsity."""
    loop = find_main_loop(instrs)
    ipe: dict[str, float] = {}
    detail: dict[str, Any] = {
        "function": name,
        "main_loop": f"0x{loop.header:x}",
        "blocks": len(loop.blocks),
        "nested_loops": len(loop.nested),
        "threads": inst.threads,
        "elements_per_iter": inst.elements,
        "per_class": {},
        "integer_per_element": {},
        "int_pipe_per_element": {},
        "smem_bytes_per_element": {},
        "params": dict(inst.params),
        "primary": inst.primary,
    }
    scale = inst.threads / inst.elements
    for s in SPARSITIES:
        trips = spec.trip_counts(s, inst) if spec.trip_counts else None
        weights = block_frequencies(loop, trips)
        if spec.block_weights:
            over = spec.block_weights(loop, s, inst)
            weights = block_frequencies(loop, trips, over)
        c = count_loop(loop, weights)
        key = str(s)
        ipe[key] = round(c.total * scale, 3)
        detail["per_class"][key] = {k: round(v * scale, 3) for k, v in c.by_class.items() if v}
        detail["integer_per_element"][key] = round(c.by_class["integer"] * scale, 3)
        detail["int_pipe_per_element"][key] = round(c.int_pipe * scale, 3)
        detail["smem_bytes_per_element"][key] = round(c.shared_bytes / 32 * scale, 3)
    return KernelResult(
        spec.name,
        f"sm_{arch}",
        inst.dtype,
        inst.n_tile,
        registers,
        spill,
        smem,
        ctas_per_sm(registers, smem, inst.threads, gpu),
        ipe,
        detail,
        name,
        inst,
        ctas_per_sm(registers, smem, inst.threads, gpu_for_arch(arch, gpu)),
    )


def report_cuda(spec: CudaSpec, log: list[str], jobs: int = 2) -> list[KernelResult]:
    nvcc = tools.find_tool("nvcc")
    cuobjdump = tools.find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        log.append(f"SKIP {spec.name}: {'nvcc' if nvcc is None else 'cuobjdump'} not found")
        return []
    tasks = [(ROOT / s, a) for s in spec.sources for a in spec.archs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outs = list(pool.map(lambda t: tools.compile_cuda(t[0], t[1], nvcc, cuobjdump), tasks))
    results = []
    for (_, arch), (sass, ptx_log) in zip(tasks, outs, strict=True):
        res = parse_ptxas(ptx_log)
        for fname, instrs in parse_sass(sass).items():
            inst = spec.match(fname)
            if inst is None:
                continue
            inst = dataclasses.replace(inst, arch=arch)
            r = res.get(fname, {"registers": 0, "spill_bytes": 0, "static_smem": 0})
            results.append(
                analyse(
                    spec,
                    fname,
                    arch,
                    instrs,
                    inst,
                    r["registers"],
                    r["spill_bytes"],
                    r["static_smem"] + inst.dynamic_smem,
                )
            )
    if not results:
        log.append(f"ERROR {spec.name}: no function in {list(spec.sources)} matched its spec")
    return results


def report_triton(spec: TritonSpec, log: list[str]) -> list[KernelResult]:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:
        log.append(f"SKIP {spec.name}: triton unavailable ({e})")
        return []
    cuobjdump = tools.find_tool("cuobjdump")
    if cuobjdump is None:
        log.append(f"SKIP {spec.name}: cuobjdump not found")
        return []
    mod_name, attr = spec.fn.split(":")
    fn = getattr(importlib.import_module(mod_name), attr)
    src_text = Path(sys.modules[mod_name].__file__).read_bytes()
    results = []
    for inst, signature, constexprs, options in spec.instances():
        key = hashlib.sha256(
            repr(
                (
                    triton.__version__,
                    spec.arch,
                    sorted(signature.items()),
                    sorted(constexprs.items()),
                    sorted(options.items()),
                )
            ).encode()
            + src_text
        ).hexdigest()[:16]
        cache = tools.cache_dir() / f"{spec.name}.{key}"
        if not (cache / "done").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", spec.arch, 32),
                options=options,
            )
            (cache / "kernel.cubin").write_bytes(compiled.asm["cubin"])
            (cache / "meta.json").write_text(
                json.dumps(
                    {"shared": int(compiled.metadata.shared), "name": compiled.metadata.name}
                )
            )
            (cache / "sass.txt").write_text(
                tools.run([cuobjdump, "-sass", str(cache / "kernel.cubin")])
            )
            (cache / "res.txt").write_text(
                tools.run([cuobjdump, "-res-usage", str(cache / "kernel.cubin")])
            )
            (cache / "done").touch()
        meta = json.loads((cache / "meta.json").read_text())
        funcs = parse_sass((cache / "sass.txt").read_text())
        res = parse_res_usage((cache / "res.txt").read_text())
        fname = meta["name"] if meta["name"] in funcs else next(iter(funcs))
        r = res.get(fname, {"registers": 0, "stack": 0, "local": 0})
        # Triton reports its whole shared-memory need (it has no separate static part).
        results.append(
            analyse(
                spec,
                fname,
                str(spec.arch),
                funcs[fname],
                inst,
                r["registers"],
                r["stack"] + r["local"],
                int(meta["shared"]),
            )
        )
    return results


def load_spec(name: str) -> Any:
    """``SPEC`` of ``bench/sass_report/specs/<name>.py``; raises ImportError if it has none."""
    mod = importlib.import_module(f"{__package__}.specs.{name}")
    spec = getattr(mod, "SPEC", None)
    if not isinstance(spec, (CudaSpec, TritonSpec)):
        raise ImportError(f"sass_report/specs/{name}.py defines no CudaSpec/TritonSpec named SPEC")
    return spec

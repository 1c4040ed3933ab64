"""The report as a text table (what CI prints)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .model import H100, SPARSITIES, Gpu


def format_report(report: Mapping[str, Any], gpu: Gpu = H100) -> str:
    lines = [
        f"Static kernel report (SASS; model estimates, no GPU run; triton {report['meta']['triton']})"
    ]
    lines.append(
        f"{'kernel':15} {'arch':6} {'dtype':5} {'n_tile':>6} {'regs':>4} {'spill':>5} "
        f"{'smem':>7} {'CTA/SM':>6}  instr/elem 50/70/90 %   (int pipe 70 %)"
    )
    for e in report["kernels"]:
        ipe = e["instr_per_element"]
        lines.append(
            f"{e['kernel']:15} {e['arch']:6} {e['dtype']:5} {e['n_tile']:>6} {e['registers']:>4} "
            f"{e['spill_bytes']:>5} {e['smem_bytes']:>7} {e['ctas_per_sm_h100']:>6}  "
            f"{ipe['0.5']:6.2f} {ipe['0.7']:6.2f} {ipe['0.9']:6.2f}   ({e['detail']['int_pipe_per_element']['0.7']:.2f})"
            + ("" if e["detail"].get("primary", True) else "  variant (not planned)")
        )
    model_plans = [p for p in report["plans"] if p.get("arch", "sm_90").startswith("sm_90")]
    if report["plans"]:
        floor = 2 * gpu.sms
        lines.append("")
        lines.append(
            f"Launch plans and predicted speed-up over dense on an {gpu.name} (fp16; "
            f"'!' = fewer than {floor} CTAs, i.e. < 2 per SM)"
        )
        lines.append(
            f"{'kernel':15} {'m':>6} {'k':>6} {'n':>3} {'s':>4} {'ctas':>7} {'split':>5} "
            f"{'pers':>4} {'pred us':>8} {'dense us':>8} {'speed-up':>8} bound"
        )
        preds = {
            (p["kernel"], p["m"], p["k"], p["n"], p["sparsity"]): p for p in report["predictions"]
        }
        for p in model_plans:
            q = preds.get((p["kernel"], p["m"], p["k"], p["n"], p["sparsity"]), {})
            flag = "!" if p["ctas"] < floor and not p["persistent"] else " "
            lines.append(
                f"{p['kernel']:15} {p['m']:>6} {p['k']:>6} {p['n']:>3} {p['sparsity']:>4} "
                f"{p['ctas']:>6}{flag} {p['split_k']:>5} {'yes' if p['persistent'] else 'no':>4} "
                f"{q.get('time_us', float('nan')):>8} {q.get('dense_us', float('nan')):>8} "
                f"{q.get('speedup', float('nan')):>7}x {q.get('bound', '')}"
            )
        lines.append("")
        lines.append("Geomean predicted speed-up, N <= 32:")
        for kernel in dict.fromkeys(p["kernel"] for p in report["predictions"]):
            parts = []
            for s in SPARSITIES:
                vals = [
                    p["speedup"]
                    for p in report["predictions"]
                    if p["kernel"] == kernel and p["sparsity"] == s
                ]
                if vals:
                    parts.append(
                        f"{int(s * 100)} %: {math.exp(sum(map(math.log, vals)) / len(vals)):.2f}x"
                    )
            flagged = sum(
                1
                for p in model_plans
                if p["kernel"] == kernel and p["ctas"] < floor and not p["persistent"]
            )
            total = sum(1 for p in model_plans if p["kernel"] == kernel)
            uncounted = any(
                not p["counted"] for p in report["predictions"] if p["kernel"] == kernel
            )
            note = " (NO instruction counts: memory-bound ceiling only)" if uncounted else ""
            lines.append(
                f"  {kernel:15} "
                + ", ".join(parts)
                + f"; plans under {floor} CTAs: {flagged}/{total}{note}"
            )
    if report["plans"]:
        lines.append("")
        lines.append(
            "Launch plans per arch (the GPU each targets; shared memory per CTA = static + "
            "dynamic of the launched instance, against the GPU's per-block limit):"
        )
        groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for p in report["plans"]:
            groups.setdefault((p["kernel"], p.get("arch", "sm_90")), []).append(p)
        for (kernel, arch), rows in groups.items():
            smem = [p["smem_bytes"] for p in rows if p.get("smem_bytes") is not None]
            limit = rows[0].get("smem_limit")
            tiles = sorted({p["tile_n"] for p in rows if p.get("tile_n") is not None})
            worst = f"max {max(smem)} B" if smem else "not compiled"
            over = sum(1 for v in smem if limit is not None and v > limit)
            lines.append(
                f"  {kernel:15} {arch:7} {rows[0].get('gpu', ''):10} {len(rows):>3} plans, "
                f"tile_n {tiles}, smem {worst} (limit {limit} B, over it: {over})"
            )
    for msg in report["meta"]["log"]:
        lines.append(msg)
    return "\n".join(lines)

"""Reports of a sweep: the terminal table, a progress bar, JSON, CSV and a PNG plot."""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.util
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TextIO

from .runner import ROW_KEYS, geomean

CPU_NOTICE = "CPU numbers: reference path, not representative of GPU kernels"
CPU_NOTICE_GENERIC = "CPU numbers: not representative of GPU kernels"
CPU_NOTICE_BASELINES = (
    "CPU numbers: baselines only (no flashsparse kernel ran), not representative of GPU kernels"
)
# Metadata repeated in every CSV row, so a CSV file alone says where its numbers come from.
CSV_META_KEYS = ("device", "torch", "triton", "flashsparse", "git_commit", "date")
_LINESTYLES = ("-", "-.", ":", (0, (5, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
METHOD_ORDER = {
    "dense": 0,
    "tiled_csl": 1,
    "bitmap": 2,
    "sliced-out": 6,
    "sliced-in": 7,
    "csr": 8,
    "2:4": 9,
}
# What a structured-slicing row is, noted under each table (its name alone is terse).
SLICED_NOTES = {
    "sliced-out": "dense F.linear keeping round((1-s)*M) output rows",
    "sliced-in": "dense F.linear keeping round((1-s)*K) input columns (x as narrow)",
}


# -- metadata -----------------------------------------------------------------------------------
def git_commit() -> str | None:
    """Commit of the checkout flashsparse runs from (``+dirty`` if tracked files changed)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def build_metadata(
    info: dict,
    settings: dict,
    *,
    device_type: str,
    timer: str,
    cache_bytes: int,
    bandwidth_gbps: float,
    copy_bytes: int,
    backends_ran: list[str],
) -> dict:
    meta = dict(info)
    meta.update(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        command="flashsparse " + " ".join(sys.argv[1:]) if sys.argv else "flashsparse bench",
        device_type=device_type,
        timer=timer,
        cache_bytes=cache_bytes,
        copy_bandwidth_gbps=bandwidth_gbps,
        copy_buffer_bytes=copy_bytes,
        backends_ran=backends_ran,
        settings=settings,
        notice=numbers_notice(device_type, backends_ran, info.get("device", "")),
    )
    return meta


def planned_notice(requested_backends: list[str]) -> str:
    """The CPU notice printed before a run, from the ``--backend`` values asked for (which
    backends really ran is known only after: :func:`numbers_notice`)."""
    # ("auto" runs the C++ CPU kernel for bitmap weights on a CPU where it builds.)
    only_reference = set(requested_backends) <= {"reference"}
    return CPU_NOTICE if only_reference else CPU_NOTICE_GENERIC


def numbers_notice(device_type: str, backends_ran: list[str], device: str) -> str:
    """One plain sentence saying what the numbers were measured on."""
    if device_type != "cuda":
        if not backends_ran:
            return CPU_NOTICE_BASELINES
        if set(backends_ran) <= {"reference"}:
            return CPU_NOTICE
        label = {"triton": "Triton interpreter", "cpu": "C++ CPU kernel"}
        names = [label.get(b, f"{b} path") for b in backends_ran]
        return f"CPU numbers: {' and '.join(names)}, not representative of GPU kernels"
    return f"GPU numbers measured on {device}"


# -- table --------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    """Four significant digits, trailing zeros kept so a column reads evenly."""
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:.0f}"
    decimals = 4 if v < 1 else 4 - len(str(int(v)))
    return f"{v:.{decimals}f}"


def _bytes_mb(v: int | None) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}" if v < 1e8 else f"{v / 1e6:.0f}"


def _gbps(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def sort_key(row: dict) -> tuple:
    method = row["method"] or ""
    base = method.split(":")[-1]
    return (
        row["n"],
        -1.0 if row["sparsity"] is None else row["sparsity"],
        METHOD_ORDER.get(base, 5),
        method,
        row["backend"] or "",
    )


def format_table(headers: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])


HEADERS = [
    "N",
    "sparsity",
    "method",
    "backend",
    "median ms",
    "[p20, p80]",
    "vs dense",
    "GB/s",
    "of BW",
    "weight MB",
    "ceiling",
    "check",
]
RIGHT = {0, 1, 4, 6, 7, 8, 9, 10}


def _cells(row: dict) -> list[str]:
    status = row["status"]
    if status == "ok":
        check = "ok"
    elif status == "WRONG":
        check = f"WRONG {row['rel_err']:.1e}"
    else:
        check = status
    spread = "-" if row["p20_ms"] is None else f"[{_ms(row['p20_ms'])}, {_ms(row['p80_ms'])}]"
    frac = "-" if row["bw_fraction"] is None else f"{100 * row['bw_fraction']:.0f}%"
    return [
        str(row["n"]),
        "-" if row["sparsity"] is None else f"{row['sparsity']:.2f}",
        row["method"] or "-",
        row["backend"] or "-",
        _ms(row["median_ms"]),
        spread,
        _x(row["speedup"]) if row["method"] != "dense" or row["status"] != "ok" else "1.00x",
        _gbps(row["gbps"]),
        frac,
        _bytes_mb(row["weight_bytes"]),
        _x(row["ceiling"]),
        check,
    ]


def format_block(rows: list[dict]) -> str:
    """The table of one (shape, dtype) block, with a header line and the reasons for skips."""
    if not rows:
        return ""
    r0 = rows[0]
    head = (
        f"{r0['layer']}  M={r0['m']} K={r0['k']}  {r0['dtype']}  mask={r0['mask']}  "
        f"dense weight {_bytes_mb(r0['dense_weight_bytes'])} MB"
    )
    ordered = sorted(rows, key=sort_key)
    # Skipped methods would be a row of dashes per N: the notes below name them with the reason.
    shown = [r for r in ordered if r["status"] != "skipped"]
    out = [head, format_table(HEADERS, [_cells(r) for r in shown], RIGHT)]
    notes: dict[str, None] = {}
    for r in ordered:
        if r["status"] in ("WRONG", "error"):
            notes[f"  {r['status']}: {r['method']} ({r['backend']}) N={r['n']}: {r['reason']}"] = (
                None
            )
        elif r["status"] == "skipped":
            notes[f"  skipped: {r['method']} ({r['backend']}): {r['reason']}"] = None
    for method, text in SLICED_NOTES.items():
        if any(r["method"] == method for r in shown):
            notes[f"  {method}: {text}; speed only, says nothing of accuracy"] = None
    for r in shown:
        if r.get("quant_err") is not None:
            notes[
                f"  {r['method']} at {r['sparsity']:.2f}: quantizing added {100 * r['quant_err']:.2f} % "
                "relative weight error (checked against its dequantized weight)"
            ] = None
    out.extend(notes)
    return "\n".join(out)


def format_summary(rows: list[dict]) -> str:
    """Geomean speed-up vs dense over the shapes: one line per method/backend/dtype/sparsity."""
    groups: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    layers = {r["layer"] for r in rows}
    ns = sorted({r["n"] for r in rows})
    for r in rows:
        if r["method"] == "dense" or r["speedup"] is None:
            continue
        key = (r["dtype"], r["sparsity"], r["method"], r["backend"])
        groups[key][r["n"]].append(r["speedup"])
    if not groups:
        return ""
    body = []
    for key in sorted(
        groups, key=lambda k: (k[0], k[1], METHOD_ORDER.get(k[2].split(":")[-1], 5), k[2], k[3])
    ):
        dtype, sp, method, backend = key
        cells = [dtype, f"{sp:.2f}", method, backend]
        cells += [_x(geomean(groups[key][n])) if groups[key].get(n) else "-" for n in ns]
        body.append(cells)
    headers = ["dtype", "sparsity", "method", "backend", *(f"N={n}" for n in ns)]
    title = f"Speed-up vs dense F.linear, geometric mean over {len(layers)} shape(s)"
    return title + "\n" + format_table(headers, body, {1, *range(4, 4 + len(ns))})


# -- progress -----------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on ``stream`` (only drawn on a terminal unless ``force``)."""

    def __init__(
        self,
        total: int,
        stream: TextIO = sys.stderr,
        *,
        enabled: bool | None = None,
        width: int = 28,
    ):
        self.total, self.done, self.stream, self.width = max(total, 1), 0, stream, width
        self.enabled = stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._drawn = False

    def advance(self, label: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        fill = int(frac * self.width)
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        text = f"\r[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} {elapsed:4.0f}s eta {eta:4.0f}s  {label}"
        self.stream.write(text[:160] + "\033[K")
        self.stream.flush()
        self._drawn = True

    def skip(self) -> None:
        """A counted step that turned out to need no work: it leaves the total."""
        self.total = max(self.total - 1, self.done, 1)

    def clear(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False


# -- files --------------------------------------------------------------------------------------
def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, meta: dict, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": [{k: _clean(r.get(k)) for k in ROW_KEYS} for r in rows]}
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def write_csv(path: str | Path, meta: dict, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*ROW_KEYS, *CSV_META_KEYS])
        tail = ["" if meta.get(k) is None else meta[k] for k in CSV_META_KEYS]
        for r in rows:
            writer.writerow(["" if _clean(r.get(k)) is None else r[k] for k in ROW_KEYS] + tail)


def plot_unavailable_reason() -> str | None:
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib, which is not installed (pip install matplotlib)"
    return None


def write_plot(path: str | Path, meta: dict, rows: list[dict]) -> None:
    """:func:`plot_figure` as a PNG at ``path``."""
    fig = plot_figure(meta, rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)


def plot_figure(meta: dict, rows: list[dict]):
    """Speed-up vs sparsity on a log axis, one panel per N, one line per method/backend/dtype
    (geomean over shapes; a marker per method, a line style per backend, so overlapping lines
    stay apart), each format's memory-bound ceiling thin and dashed in the same colour, dense
    at 1."""
    reason = plot_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    ns = sorted({r["n"] for r in rows})
    cols = min(len(ns), 4) or 1
    nrows = -(-len(ns) // cols) or 1
    fig = Figure(figsize=(4.2 * cols, 3.6 * nrows + 0.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False)
    series: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    ceilings: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["method"] == "dense" or r["sparsity"] is None:
            continue
        if r["speedup"] is not None:
            series[(r["n"], r["method"], r["backend"], r["dtype"])][r["sparsity"]].append(
                r["speedup"]
            )
        if r["ceiling"] is not None and r["method"] not in ("csr", "2:4"):  # flashsparse formats
            ceilings[(r["n"], r["method"], r["dtype"])][r["sparsity"]].append(r["ceiling"])
    methods = sorted(
        {(k[1], k[2], k[3]) for k in series} | {(k[1], None, k[2]) for k in ceilings},
        key=lambda k: (METHOD_ORDER.get(k[0].split(":")[-1], 5), k[0], k[2], k[1] or ""),
    )
    colour_keys = sorted({(m, d) for m, _, d in methods})
    colours = {key: f"C{i % 10}" for i, key in enumerate(colour_keys)}
    styles = {
        b: s for b, s in zip(sorted({b for _, b, _ in methods if b}), _LINESTYLES * 4, strict=False)
    }
    method_names = sorted({m for m, _, _ in methods}, key=lambda m: (METHOD_ORDER.get(m, 5), m))
    markers = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(method_names)}
    # One y range for every panel, from what was measured (and 1): the ceilings are drawn
    # inside it and clipped, so a 7x ceiling never flattens a 0.05x measurement.
    measured = [geomean(v) for pts in series.values() for v in pts.values()] + [1.0]
    tops = [geomean(v) for pts in ceilings.values() for v in pts.values()] + [1.0]
    lo = min(measured) / 1.6
    hi = max(max(measured) * 1.6, min(max(tops) * 1.1, max(measured) * 3))
    n_layers = len({r["layer"] for r in rows})
    for idx, n in enumerate(ns):
        ax = axes[idx // cols][idx % cols]
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=1.2, label="dense F.linear")
        for (method, dtype), colour in colours.items():
            pts = ceilings.get((n, method, dtype))
            if pts:
                xs = sorted(pts)
                ax.plot(
                    xs,
                    [geomean(pts[x]) for x in xs],
                    linestyle=(0, (4, 3)),
                    color=colour,
                    alpha=0.45,
                    linewidth=0.8,
                    label=f"ceiling {method} {dtype}",
                )
        for method, backend, dtype in methods:
            pts = series.get((n, method, backend, dtype)) if backend else None
            if not pts:
                continue
            xs = sorted(pts)
            ax.plot(
                xs,
                [geomean(pts[x]) for x in xs],
                marker=markers[method],
                markersize=6,
                markerfacecolor="none" if method in ("csr", "2:4") else colours[(method, dtype)],
                color=colours[(method, dtype)],
                linestyle=styles.get(backend, "-"),
                linewidth=1.6,
                label=f"{method} ({backend}) {dtype}",
            )
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_title(f"N = {n}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"speed-up vs dense (log; geomean, {n_layers} shape{'s' * (n_layers > 1)})")
        ax.grid(alpha=0.3, which="both")
    for idx in range(len(ns), nrows * cols):
        axes[idx // cols][idx % cols].set_visible(False)
    seen: dict[str, object] = {}
    for row_axes in axes:
        for ax in row_axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                if not label.startswith("ceiling "):
                    seen.setdefault(label, handle)
    if ceilings:  # one legend entry for all of them: they share the style of their format
        seen["memory-bound ceiling (its format's colour)"] = Line2D(
            [], [], color="grey", linestyle=(0, (4, 3)), linewidth=0.8
        )
    fig.legend(
        list(seen.values()),
        list(seen),
        loc="outside lower center",
        ncols=min(2 * cols if cols > 1 else 2, len(seen)),
        fontsize=8,
    )
    title = f"flashsparse bench: {meta.get('device', '?')}"
    if meta.get("device_type") != "cuda":
        title += f"\n{meta.get('notice', CPU_NOTICE)}"
    fig.suptitle(title, fontsize=10)
    return fig

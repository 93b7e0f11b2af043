"""Writing the results of :mod:`benchmarks.bench_loss`: metadata, derived columns, CSV, JSON, markdown, PNG."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from ._contestants import CONTESTANTS, package_versions
from ._measure import gemm_flops

SHAPE_KEYS = ("device", "dtype", "N", "n", "D", "k", "scale", "margin", "margin_type", "margin_grad")
COLUMNS = (
    "contestant",
    "kind",
    "status",
    *SHAPE_KEYS,
    "semantics",
    "check",
    "agrees",
    "loss_err",
    "grad_x_err",
    "grad_w_err",
    "fwd_ms",
    "fwd_ms_min",
    "fwd_ms_max",
    "fwd_bwd_ms",
    "fwd_bwd_ms_min",
    "fwd_bwd_ms_max",
    "fwd_cpu_ms",
    "fwd_bwd_cpu_ms",
    "mem_fwd_mib",
    "mem_fwd_bwd_mib",
    "fwd_tflops",
    "fwd_bwd_tflops",
    "fwd_pct_peak",
    "fwd_bwd_pct_peak",
    "fwd_vs_ref",
    "fwd_bwd_vs_ref",
    "fwd_bwd_cpu_vs_ref",
    "mem_vs_ref",
    "reps",
    "compile_backend",
    "case_wall_s",
    "load_1m",
    "reason",
)

# Dense tensor-core peaks (TFLOP/s, no sparsity) by GPU name fragment; first match wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)


# ----------------------------------------------------------------------------- metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_model()


def peak_tflops(device: str, dtype: str, override: float | None) -> float | None:
    """The device's dense peak for GEMMs in ``dtype`` (fp32 means tf32 unless matmul precision is 'highest')."""
    if override:
        return override
    if device != "cuda":
        return None
    name = device_name(device)
    key = dtype
    if dtype == "fp32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    for fragment, peaks in GPU_PEAK_TFLOPS:
        if fragment in name:
            return peaks[key]
    return None


def metadata(device: str, argv: list[str], preset: str | None) -> dict:
    """Everything needed to reproduce and judge a run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": list(load) if load else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "peers": package_versions(),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_loss", *argv]),
        "preset": preset,
        "flops_convention": "1 GEMM pass (2 N n k) for fwd, 4 for fwd+bwd (docs/design.md, section 4.2)",
        "memory_convention": (
            "CUDA allocator peak minus allocated before the call"
            if device == "cuda"
            else "peak RSS (VmHWM, reset via clear_refs) minus RSS before the call, one fresh process per case"
        ),
    }


# ----------------------------------------------------------------------------- derived columns


def shape_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in SHAPE_KEYS)


def add_derived(rows: list[dict], peak_override: float | None = None) -> None:
    """TFLOP/s, % of peak and the ratios to the reference of the same shape, in place."""
    refs = {shape_key(r): r for r in rows if r["contestant"] == "reference" and r["status"] == "ok"}
    for row in rows:
        row["semantics"] = _semantics(row)
        if row["status"] != "ok":
            continue
        peak = peak_tflops(row["device"], row["dtype"], peak_override)
        for mode in ("fwd", "fwd_bwd"):
            ms = row.get(f"{mode}_ms")
            if ms:
                tflops = gemm_flops(row["N"], row["n"], row["k"], mode) / (ms * 1e-3) / 1e12
                row[f"{mode}_tflops"] = tflops
                row[f"{mode}_pct_peak"] = 100.0 * tflops / peak if peak else None
        ref = refs.get(shape_key(row))
        if ref:
            for mode in ("fwd", "fwd_bwd"):
                row[f"{mode}_vs_ref"] = _ratio(row.get(f"{mode}_ms"), ref.get(f"{mode}_ms"))
            row["fwd_bwd_cpu_vs_ref"] = _ratio(row.get("fwd_bwd_cpu_ms"), ref.get("fwd_bwd_cpu_ms"))
            row["mem_vs_ref"] = _ratio(row.get("mem_fwd_bwd_mib"), ref.get("mem_fwd_bwd_mib"))


def _semantics(row: dict) -> str:
    if row["contestant"] in ("cce", "cce-compile"):
        return "margin-free (m=0)"
    if row["contestant"] == "pml":
        return f"{row['margin_type']}, exact margin grad"
    if row["contestant"] == "gemm-floor":
        return "GEMMs only"
    return f"{row['margin_type']}, {row['margin_grad']}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


# ----------------------------------------------------------------------------- files


def write_all(rows: list[dict], meta: dict, out_dir: Path, stem: str, plot: bool = True) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``.json``, ``.md`` and (if matplotlib is there) ``.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("csv", "json", "md", "png")}
    _atomic_write(paths["csv"], _csv_text(rows))
    _atomic_write(paths["json"], json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    plotted = plot and write_plot(rows, meta, paths["png"])
    if not plotted:
        paths.pop("png")
    _atomic_write(paths["md"], markdown(rows, meta, paths.get("png")))
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _csv_text(rows: list[dict]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt_csv(row.get(k)) for k in COLUMNS})
    return buf.getvalue()


def _fmt_csv(v: object) -> object:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v)


def _ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1e3:.3g} s" if v >= 1000 else f"{v:.3g} ms" if v >= 1 else f"{v * 1e3:.3g} µs"


def markdown(rows: list[dict], meta: dict, png: Path | None = None) -> str:
    """A markdown report: machine line, one table per shape group, unavailable contestants with reasons."""
    gpu = meta["device"] == "cuda"
    lines = [
        f"**{meta['device_name']}** ({meta['device']}, {meta['torch_threads']} torch threads), "
        f"{meta['date_utc']}, torch {meta['torch']}, triton {meta['triton']}, commit `{meta['git_commit'][:12]}`, "
        f"load average at start {_num((meta.get('load_avg_start') or [None])[0], '{:.2f}')}.",
        "",
        f"`{meta['command']}`",
        "",
        "Time: median [min–max] of the reps after warm-up; fwd = training forward (autograd recording), "
        "fwd+bwd = forward + backward. Memory: peak added by fwd+bwd "
        f"({'CUDA allocator' if gpu else 'peak RSS over the RSS before the call, fresh process per case'}). "
        "× ref: ratio to the reference (PFC-style, materialised logits) on the same shape. "
        "TFLOP/s counts 1 GEMM pass (2·N·n·k) for fwd and 4 for fwd+bwd."
        + (
            ""
            if gpu
            else " CPU time: median process CPU time (all threads) of fwd+bwd; less sensitive than the wall "
            "clock to other jobs on the machine."
        ),
        "",
    ]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[shape_key(row)].append(row)
    unavailable: dict[str, str] = {}
    order = ("dtype", "margin_type", "margin_grad", "scale", "margin", "N", "D", "k", "n")
    for key, group in sorted(groups.items(), key=lambda kv: tuple(str(kv[1][0][k]).zfill(12) for k in order)):
        head = dict(zip(SHAPE_KEYS, key, strict=True))
        lines.append(
            f"N={head['N']}, n_sampled={head['n']}, D={head['D']}, k={head['k']}, {head['dtype']}, "
            f"s={head['scale']:g}, m={head['margin']:g}, {head['margin_type']}, {head['margin_grad']}"
        )
        lines.append("")
        cols = ["contestant", "computes", "check", "fwd", "fwd+bwd", "mem added", "× ref time", "× ref mem", "TFLOP/s"]
        if gpu:
            cols.append("% peak")
        else:
            cols += ["fwd+bwd CPU time", "× ref CPU time"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for row in group:
            if row["status"] == "unavailable":
                unavailable.setdefault(row["contestant"], row["reason"])
                continue
            if row["status"] != "ok":
                cells = [row["contestant"], row.get("semantics", ""), row.get("check", "–"), row["status"]]
                cells += [row.get("reason", "")] + [""] * (len(cols) - 5)
                lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
                continue
            check = row.get("check", "–")
            if row.get("agrees") and row["contestant"] != "reference":
                check = f"ok ({max(row['loss_err'], row['grad_x_err'], row['grad_w_err']):.0e})"
            cells = [
                f"**{row['contestant']}**" if row["kind"] == "ours" else row["contestant"],
                row.get("semantics", ""),
                check,
                f"{_ms(row.get('fwd_ms'))} [{_ms(row.get('fwd_ms_min'))}–{_ms(row.get('fwd_ms_max'))}]",
                f"{_ms(row.get('fwd_bwd_ms'))} [{_ms(row.get('fwd_bwd_ms_min'))}–{_ms(row.get('fwd_bwd_ms_max'))}]",
                f"{_num(row.get('mem_fwd_bwd_mib'), '{:.0f}')} MiB",
                _num(row.get("fwd_bwd_vs_ref"), "{:.2f}×"),
                _num(row.get("mem_vs_ref"), "{:.3f}×"),
                _num(row.get("fwd_bwd_tflops"), "{:.3g}"),
            ]
            if gpu:
                cells.append(_num(row.get("fwd_bwd_pct_peak"), "{:.0f} %"))
            else:
                cells += [_ms(row.get("fwd_bwd_cpu_ms")), _num(row.get("fwd_bwd_cpu_vs_ref"), "{:.2f}×")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if unavailable:
        lines.append("Not run here:")
        lines.append("")
        for name, reason in unavailable.items():
            lines.append(f"- `{name}` ({CONTESTANTS[name].description}): {reason}")
        lines.append("")
    if png is not None:
        lines.append(f"![time and memory vs n_sampled]({png.name})")
        lines.append("")
    return "\n".join(lines)


def _series(rows: list[dict]) -> dict[tuple, dict[str, list[tuple[int, float, float]]]]:
    """Rows that differ only in ``n``, by (shape without n) -> contestant -> [(n, ms, MiB)]."""
    out: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["status"] != "ok" or not row.get("fwd_bwd_ms"):
            continue
        key = tuple(row[k] for k in SHAPE_KEYS if k != "n")
        out[key][row["contestant"]].append((row["n"], row["fwd_bwd_ms"], row.get("mem_fwd_bwd_mib")))
    return {k: v for k, v in out.items() if len({n for pts in v.values() for n, _, _ in pts}) >= 2}


def write_plot(rows: list[dict], meta: dict, path: Path) -> bool:
    """Time and memory of fwd+bwd vs n_sampled, log-log, one line per contestant. False if nothing to plot."""
    series = _series(rows)
    if not series:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 4.2 * len(series)), squeeze=False)
    keys = [k for k in SHAPE_KEYS if k != "n"]
    for (key, by_contestant), (ax_t, ax_m) in zip(series.items(), axes, strict=True):
        head = dict(zip(keys, key, strict=True))
        title = f"N={head['N']}, D={head['D']}, k={head['k']}, {head['dtype']}, {head['margin_type']}"
        for name in (c for c in CONTESTANTS if c in by_contestant):
            pts = sorted(by_contestant[name])
            kind = CONTESTANTS[name].kind
            style = {"ours": "-o", "peer": "--s"}.get(kind, ":")
            color = f"C{list(CONTESTANTS).index(name)}"  # one colour per contestant in every panel
            ns = [p[0] for p in pts]
            ax_t.plot(ns, [p[1] for p in pts], style, color=color, label=name)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None and not math.isnan(p[2]) and p[2] > 0]
            if mem and kind != "floor":
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], style, color=color, label=name)
        for ax, ylabel in ((ax_t, "fwd+bwd time, median (ms)"), (ax_m, "peak memory added (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("n_sampled (classes)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    title = f"{meta['device_name']} — {meta['date_utc'][:10]} — torch {meta['torch']}"
    if meta.get("load_avg_start"):
        title += f" — load average {meta['load_avg_start'][0]:.1f} at start"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True

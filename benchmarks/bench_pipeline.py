"""The pipeline at scale on this machine, on synthetic data it makes itself.

(a) Data loading: a webdataset of tiny images (``--shards`` tar shards holding the largest of
``--sizes`` samples; a smaller size is a prefix of the shards), read by one rank the indexed way
(``unicom.data.wds_source``: every tar header indexed at start-up, one record per sample) and as
a stream (``unicom.stream.ShardStream`` with pseudo-labels joined by position through a shard
table), and the features step over it (``unicom.features.extract``, raw 8x8 pixels, streamed).
Per mode and size, in a fresh process: start-up time (until the first batch; for the features
step until the first batch is encoded), resident memory the data side adds (peak RSS minus RSS
before it was built), and samples/s over ``--measure-samples`` samples (the features step: all
of them). Memory per sample is the slope of that memory between the sizes.

(b) k-means at ``2M x 64 -> 20,000`` clusters, from ``benchmarks/_bench_kmeans.py`` when it is
present (``run_kmeans_bench(out_dir, quick) -> dict``); its result is merged in.

    python -m benchmarks.bench_pipeline                 # the full run -> benchmarks/results/<name>.{md,json,png}
    python -m benchmarks.bench_pipeline --quick         # small sizes, seconds
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from . import _report
from ._measure import _status_kib

MODES = ("indexed", "stream", "features")
FULL = dict(sizes=[50_000, 100_000, 200_000], shards=100, measure_samples=10_000)
QUICK = dict(sizes=[400, 800, 1600], shards=8, measure_samples=200)
BATCH = 64


def _pngs(count: int) -> list[bytes]:
    """``count`` distinct 8x8 grey PNGs; samples reuse them (decoding costs the same)."""
    from PIL import Image

    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("L", (8, 8), i % 256).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def make_data(root: Path, samples: int, shards: int) -> tuple[list[str], int]:
    """``shards`` tar shards of ``samples`` tiny images (``<key>.png`` + ``.cls``), a shard table and
    pseudo-labels in ``root``; returns the shard paths and samples per shard."""
    from unicom import atomic
    from unicom.stream import ShardTable

    per_shard = -(-samples // shards)
    images = _pngs(256)
    paths = []
    for s in range(shards):
        path = root / f"{s:05d}.tar"
        paths.append(str(path))
        if path.is_file():
            continue
        temp = path.with_suffix(".part")
        with tarfile.open(temp, "w") as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                for ext, data in (("png", images[n % 256]), ("cls", str(n % 1000).encode())):
                    info = tarfile.TarInfo(f"{n:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(temp, path)
    counts = np.full(shards, per_shard, np.int64)
    ShardTable([os.path.basename(p) for p in paths], counts, np.arange(shards) * per_shard, counts).save(root)
    atomic.save_npy(root / "labels.npy", (np.arange(shards * per_shard) % 1000).astype(np.int64))
    return paths, per_shard


def measure(mode: str, root: Path, shards: list[str], measure_samples: int) -> dict:
    """Build one rank's data loader of ``mode`` over ``shards`` and read from it (run in a fresh process)."""
    import torch

    from unicom.data import EpochBatchSampler, ImageDataset, wds_source
    from unicom.model import pixel_transform
    from unicom.stream import PositionLabels, ShardStream

    torch.set_num_threads(1)
    transform = pixel_transform(8)
    base_kib = _status_kib("VmRSS")
    started = time.perf_counter()
    if mode == "features":
        return _measure_features(shards, base_kib)
    if mode == "indexed":
        source = wds_source(",".join(shards))
        samples = len(source)
        dataset = ImageDataset(source, transform, seed=0)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=EpochBatchSampler(samples, BATCH, 0, 0))
    else:
        join = PositionLabels.open(root, root / "labels.npy")
        dataset = ShardStream(shards, transform, BATCH, seed=0, labels=join, buffer=1000)
        samples = int(dataset.kept.sum())
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)
    batches = iter(loader)
    next(batches)
    startup = time.perf_counter() - started
    read, started = 0, time.perf_counter()
    while read < measure_samples:
        read += len(next(batches)[0])
    seconds = time.perf_counter() - started
    data_kib = _status_kib("VmHWM") - base_kib
    return {
        "mode": mode,
        "samples": samples,
        "shards": len(shards),
        "startup_s": round(startup, 3),
        "data_rss_mib": round(data_kib / 1024, 1),
        "samples_per_s": round(read / seconds, 1),
    }


def _measure_features(shards: list[str], base_kib: int) -> dict:
    """``unicom-features`` (raw pixels, 8x8) over all of ``shards``: start-up until the first batch
    is encoded, memory the step adds, samples/s after start-up."""
    from unicom import features

    # The step has no hook for "first batch encoded": note it by wrapping the encoder (this
    # runs in a process of its own, see _measure_in_child).
    first: list[float] = []
    encode = features._Encoder.__call__

    def timed(self, images, captions):
        if not first:
            first.append(time.perf_counter())
        return encode(self, images, captions)

    features._Encoder.__call__ = timed
    with tempfile.TemporaryDirectory() as out:
        cfg = features.FeaturesConfig(
            data=",".join(shards), data_format="wds", output_dir=out, model="pixels", pixel_size=8,
            batch_size=BATCH, num_workers=0, device="cpu",
        )  # fmt: skip
        started = time.perf_counter()
        index = features.extract(cfg, quiet=True)
        done = time.perf_counter()
    return {
        "mode": "features",
        "samples": int(index["rows"]),
        "shards": len(shards),
        "startup_s": round(first[0] - started, 3),
        "data_rss_mib": round((_status_kib("VmHWM") - base_kib) / 1024, 1),
        "samples_per_s": round(index["rows"] / (done - first[0]), 1),
    }


def _measure_in_child(mode: str, root: Path, shards: list[str], measure_samples: int) -> dict:
    """:func:`measure` in a fresh interpreter, so that its peak RSS is its own."""
    args = json.dumps([mode, str(root), shards, measure_samples])
    code = "import json,sys; from benchmarks.bench_pipeline import measure as m; from pathlib import Path; "
    code += "a=json.loads(sys.argv[1]); print(json.dumps(m(a[0], Path(a[1]), a[2], a[3])))"
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"measuring {mode} on {len(shards)} shards failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_sample_bytes(rows: list[dict], mode: str) -> float | None:
    """Slope of the data side's memory against the samples (bytes per sample), least squares."""
    pts = [(r["samples"], r["data_rss_mib"] * 2**20) for r in rows if r["mode"] == mode]
    if len(pts) < 2:
        return None
    x, y = np.array(pts, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def kmeans_part(out_dir: Path, quick: bool) -> dict:
    """Part (b), when ``benchmarks/_bench_kmeans.py`` is present."""
    try:
        from benchmarks._bench_kmeans import run_kmeans_bench
    except ImportError as exc:
        return {"status": "unavailable", "reason": f"benchmarks._bench_kmeans: {exc}"}
    return run_kmeans_bench(out_dir, quick)


def markdown(result: dict, png: str | None) -> str:
    meta = result["meta"]
    lines = [
        "# Pipeline at scale (CPU)",
        "",
        f"{meta['date_utc']}, {meta['cpu_model']} ({meta['cpu_count']} cores), commit {meta['git_commit']}, "
        f"`{meta['command']}`",
        "",
        "## (a) Data loading, one rank (num_workers=0, 8x8 PNGs, pixel transform)",
        "",
        "| mode | samples | shards | start-up (s) | data RSS (MiB) | samples/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["loading"]:
        lines.append(
            f"| {r['mode']} | {r['samples']:,} | {r['shards']} | {r['startup_s']:.2f} | {r['data_rss_mib']:.1f} "
            f"| {r['samples_per_s']:,.0f} |"
        )
    lines += ["", "Memory per sample (slope of data RSS against samples):", ""]
    for mode, slope in result["bytes_per_sample"].items():
        lines.append(f"- {mode}: {'n/a' if slope is None else f'{slope:.1f} bytes/sample'}")
    lines += [
        "",
        "Data RSS is the peak resident memory of the process minus its resident memory before the data side "
        "was built (torch and the interpreter excluded); the stream holds per-shard counts and one shard's "
        "labels at a time, the indexed source one record per sample; the features step writes one output "
        "shard per tar and holds the features of the tar in progress. Start-up runs until the first batch.",
    ]
    if png:
        lines += ["", f"![data loading]({png})"]
    if result["kmeans"]:
        lines += ["", "## (b) k-means", ""]
        lines += ["| measurement | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten(result["kmeans"])]
    return "\n".join(lines) + "\n"


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, leaf)`` pairs of nested dicts."""
    pairs: list[tuple[str, object]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            pairs += _flatten(value, f"{prefix}{key}.")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def plot(rows: list[dict], path: Path) -> bool:
    """Start-up time and data RSS against samples, per mode; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from unicom import atomic

    fig = Figure(figsize=(9, 3.6))
    startup, memory = fig.subplots(1, 2)
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        x = [r["samples"] for r in mine]
        startup.plot(x, [r["startup_s"] for r in mine], "o-", label=mode)
        memory.plot(x, [r["data_rss_mib"] for r in mine], "o-", label=mode)
    startup.set(xlabel="samples", ylabel="start-up to first batch (s)", title="start-up")
    memory.set(xlabel="samples", ylabel="data RSS (MiB)", title="memory of one rank's data side")
    for ax in (startup, memory):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic.write_bytes(path, buffer.getvalue())
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"samples per measurement (default {FULL['sizes']})")
    parser.add_argument("--shards", type=int, help=f"shards of the largest size (default {FULL['shards']})")
    parser.add_argument("--measure-samples", type=int, help="samples read for samples/s")
    parser.add_argument("--data-dir", help="where the synthetic shards go (default: a temporary folder)")
    parser.add_argument("--no-kmeans", action="store_true", help="skip part (b)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--name", default="pipeline-cpu")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    sizes = sorted(args.sizes or preset["sizes"])
    shards = args.shards or preset["shards"]
    measure_samples = args.measure_samples or preset["measure_samples"]
    if min(sizes) < 1 or shards < 1 or measure_samples < 1:
        parser.error("--sizes, --shards and --measure-samples must be positive")
    out = Path(args.out_dir)
    meta = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": _report.cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": list(os.getloadavg()),
        "git_commit": _report.git_commit(),
        "command": " ".join(["python", "-m", "benchmarks.bench_pipeline", *(argv or sys.argv[1:])]),
    }
    with tempfile.TemporaryDirectory() as temp:
        root = Path(args.data_dir or temp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        paths, per_shard = make_data(root, max(sizes), shards)
        meta["data_seconds"] = round(time.perf_counter() - t, 1)
        rows = []
        for size in sizes:
            subset = paths[: max(1, -(-size // per_shard))]
            for mode in MODES:
                row = _measure_in_child(mode, root, subset, min(measure_samples, size - BATCH))
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    result = {
        "meta": meta,
        "loading": rows,
        "bytes_per_sample": {mode: per_sample_bytes(rows, mode) for mode in MODES},
        "kmeans": {} if args.no_kmeans else kmeans_part(out, args.quick),
    }
    from unicom import atomic

    png = out / f"{args.name}.png"
    drawn = plot(rows, png)
    atomic.write_json(out / f"{args.name}.json", result)
    atomic.write_text(out / f"{args.name}.md", markdown(result, png.name if drawn else None))
    print(markdown(result, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

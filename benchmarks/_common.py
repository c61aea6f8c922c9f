"""Shared helpers of the benchmark scripts: machine description, timing, memory, tables and the JSON schema.

Every script writes one JSON document (``benchmarks/results/<name>.json`` unless ``--out`` says otherwise)::

    {
      "benchmark": "<name>", "schema_version": 1, "created_utc": "...", "command": "...",
      "quick": bool, "device": "cpu" | "cuda",
      "machine": {...},                 # cpu model, cores, torch version, threads, GPU name
      "load_avg_start": [1m, 5m, 15m], "load_avg_end": [1m, 5m, 15m],
      "settings": {...},                # what the script was asked to run
      "results": [ {...}, ... ],         # one row per measured configuration
      "notes": ["..."]
    }

Timings are reported as the median and the minimum over ``repeat`` runs after ``warmup`` runs. On a machine
shared with other jobs the minimum is the better estimate of the undisturbed cost; the load averages recorded at
start and end say how busy the machine was.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUIRED_KEYS = (
    "benchmark",
    "schema_version",
    "created_utc",
    "command",
    "quick",
    "device",
    "machine",
    "load_avg_start",
    "load_avg_end",
    "settings",
    "results",
    "notes",
)


# ---------------------------------------------------------------------------------------------- machine / CLI
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def machine_info(device: str) -> dict[str, Any]:
    """Describe the machine: CPU model and ISA flags, cores, torch build and threads, and the GPU if used."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def load_avg() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every script shares: ``--quick``, ``--device``, ``--repeat``, ``--warmup``, ``--threads``, ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny settings that finish in well under 30 s (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions per configuration")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<name>.json)")
    return p


def setup(args: argparse.Namespace, *, repeat: tuple[int, int], warmup: tuple[int, int]) -> torch.device:
    """Apply ``--threads``, fill ``repeat``/``warmup`` defaults as ``(full, quick)`` pairs; return the device."""
    if args.threads is None and args.quick:
        # a smoke run on a shared machine: one thread avoids OpenMP spin-waiting against other jobs
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeat is None:
        args.repeat = repeat[1] if args.quick else repeat[0]
    if args.warmup is None:
        args.warmup = warmup[1] if args.quick else warmup[0]
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but torch.cuda.is_available() is False")
    return dev


class Recorder:
    """Collects the document of one run and writes it; create it *before* the work so the start load is right."""

    def __init__(self, name: str, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        self.name = name
        self.args = args
        self.doc: dict[str, Any] = {
            "benchmark": name,
            "schema_version": SCHEMA_VERSION,
            "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "quick": bool(args.quick),
            "device": str(args.device),
            "machine": machine_info(str(args.device)),
            "load_avg_start": load_avg(),
            "load_avg_end": [],
            "settings": {"repeat": args.repeat, "warmup": args.warmup, "threads": torch.get_num_threads(), **settings},
            "results": [],
            "notes": [],
        }

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.doc["results"]

    def add(self, row: dict[str, Any]) -> None:
        """Append one result row (and flush the file, so a killed run keeps what it measured)."""
        self.results.append(row)
        self.write(final=False)

    def note(self, text: str) -> None:
        self.doc["notes"].append(text)

    def path(self) -> Path:
        return self.args.out if self.args.out is not None else RESULTS_DIR / f"{self.name}.json"

    def write(self, final: bool = True) -> Path:
        """Write the JSON (``final`` also records the end load average)."""
        if final:
            self.doc["load_avg_end"] = load_avg()
        out = self.path()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=_json_default) + "\n")
        tmp.replace(out)
        return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed.

    Besides wall-clock time it records the process CPU time (``time.process_time``, all threads). With one
    thread on a CPU shared with other jobs, ``cpu_min_s`` is close to the undisturbed wall time, whereas the
    wall time grows with the machine's load.

    Returns:
        ``{"median_s", "min_s", "times_s", "cpu_median_s", "cpu_min_s"}``.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times, cpu = [], []
    for _ in range(max(repeat, 1)):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": [round(t, 6) for t in times],
        "cpu_median_s": statistics.median(cpu),
        "cpu_min_s": min(cpu),
    }


# ---------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakRSS:
    """Polls the process RSS from a background thread (every ``interval`` s) and keeps the maximum."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> _PeakRSS:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


@contextmanager
def measure_peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Peak memory of the enclosed work, written into the yielded dict on exit.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry (``peak_mem_mib``, method
    ``cuda_max_memory_allocated``). CPU: the process RSS sampled every 2 ms minus the RSS at entry (method
    ``rss_delta``); it includes allocator caching and is approximate, but unlike ``tracemalloc`` it sees tensor
    storage.
    """
    out: dict[str, Any] = {}
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        sync(device)
        out["peak_mem_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
        out["mem_method"] = "cuda_max_memory_allocated"
        return
    base = _rss_bytes()
    with _PeakRSS() as sampler:
        yield out
    out["peak_mem_mib"] = round(max(sampler.peak - base, 0) / 2**20, 1)
    out["mem_method"] = "rss_delta"


# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn`` (forward and, if ``fn`` calls it, backward) counted by ``FlopCounterMode``.

    ``FlopCounterMode`` counts matmuls/convolutions only and does not see the CPU flash-attention kernel, so
    callers count with the ``eager`` attention backend, whose attention matmuls are the same FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int, repeat: int = 5) -> dict[str, float]:
    """Best ``n × n`` matmul rate in GFLOP/s: ``{"gflops": wall-clock based, "gflops_cpu": CPU-time based}``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b), device, repeat, 1)
    flops = 2.0 * n**3
    return {"gflops": flops / t["min_s"] / 1e9, "gflops_cpu": flops / max(t["cpu_min_s"], 1e-9) / 1e9}


def load_matmul_peak(
    device: torch.device, dtypes: Sequence[torch.dtype] = ()
) -> tuple[dict[str, dict[str, float]], str]:
    """Matmul peaks per dtype name (``"bfloat16"``) as ``{"gflops", "gflops_cpu"}`` and where they came from.

    Reads ``results/matmul_peak.json`` when it was written for the same device type and thread count; otherwise
    (or for a dtype it lacks) measures ``matmul_rate`` inline at n = 2048 (CPU) / 8192 (CUDA).
    """
    peaks: dict[str, dict[str, float]] = {}
    source = "inline"
    path = RESULTS_DIR / "matmul_peak.json"
    if path.is_file():
        doc = json.loads(path.read_text())
        same_dev = str(doc.get("device", "")).split(":")[0] == device.type
        same_threads = device.type == "cuda" or doc.get("settings", {}).get("threads") == torch.get_num_threads()
        if same_dev and same_threads:
            source = str(path.name)
            for row in doc.get("results", []):
                dt = row.get("dtype")
                if dt is None:
                    continue
                cur = peaks.setdefault(dt, {"gflops": 0.0, "gflops_cpu": 0.0})
                cur["gflops"] = max(cur["gflops"], float(row.get("gflops_best", 0.0)))
                cur["gflops_cpu"] = max(cur["gflops_cpu"], float(row.get("gflops_best_cpu", 0.0)))
    for dt in dtypes:
        name = str(dt).removeprefix("torch.")
        if name not in peaks or not peaks[name]["gflops_cpu"]:
            peaks[name] = matmul_rate(dt, device, 8192 if device.type == "cuda" else 2048)
            source = "inline" if source == "inline" else f"{source} + inline"
    return peaks, source


# ---------------------------------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0.0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print ``rows`` as an aligned text table with the given ``columns``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def finish(rec: Recorder, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Print the table and notes, write the JSON and print its path."""
    print_table(rows, columns)
    for n in rec.doc["notes"]:
        print(f"note: {n}")
    path = rec.write()
    print(f"load avg start {rec.doc['load_avg_start']} end {rec.doc['load_avg_end']}; wrote {path}")
    return path


def dtype_of(name: str) -> torch.dtype:
    """``"fp32"|"float32"`` -> ``torch.float32``; ``"bf16"|"bfloat16"`` -> ``torch.bfloat16``; ``fp16`` too."""
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name not in table:
        raise SystemExit(f"unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]

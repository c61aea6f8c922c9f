"""Measured matmul peak (GFLOP/s) of this machine in fp32 and bf16: the roofline the other benchmarks compare to.

Times ``a @ b`` for large square matrices (``2 n³`` FLOPs each) and reports the median and the best rate per
size and dtype. ``gflops_best`` of the largest sizes is what :mod:`backbone` uses as the peak for model FLOPs
utilisation (MFU). On CPUs with AVX512-BF16 or AMX the bf16 rate is several times the fp32 rate.

Usage::

    python benchmarks/matmul_peak.py            # n = 1024, 2048, 4096
    python benchmarks/matmul_peak.py --quick    # n = 512, 1024
    python benchmarks/matmul_peak.py --device cuda
"""

from __future__ import annotations

import torch
from _common import Recorder, base_parser, dtype_of, finish, setup, time_fn


def main(argv: list[str] | None = None) -> int:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="square sizes n")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = p.parse_args(argv)
    dev = setup(args, repeat=(10, 3), warmup=(2, 1))
    sizes = args.sizes or ([512, 1024] if args.quick else [1024, 2048, 4096])
    if dev.type == "cuda" and args.sizes is None and not args.quick:
        sizes = [4096, 8192, 16384]
    rec = Recorder("matmul_peak", args, {"sizes": sizes, "dtypes": args.dtypes})
    for dname in args.dtypes:
        dt = dtype_of(dname)
        for n in sizes:
            g = torch.Generator(device="cpu").manual_seed(0)
            a = torch.randn(n, n, generator=g).to(device=dev, dtype=dt)
            b = torch.randn(n, n, generator=g).to(device=dev, dtype=dt)
            t = time_fn(lambda a=a, b=b: torch.mm(a, b), dev, args.repeat, args.warmup)
            flops = 2.0 * n**3
            rec.add(
                {
                    "dtype": str(dt).removeprefix("torch."),
                    "n": n,
                    "flops": flops,
                    **t,
                    "gflops_median": flops / t["median_s"] / 1e9,
                    "gflops_best": flops / t["min_s"] / 1e9,
                    "gflops_best_cpu": flops / max(t["cpu_min_s"], 1e-9) / 1e9,
                }
            )
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    for r in rec.results:
        best[r["dtype"]] = max(best.get(r["dtype"], 0.0), r["gflops_best"])
        best_cpu[r["dtype"]] = max(best_cpu.get(r["dtype"], 0.0), r["gflops_best_cpu"])
    if "float32" in best and "bfloat16" in best:
        rec.note(
            f"bf16/fp32 best-rate ratio = {best['bfloat16'] / best['float32']:.2f} (wall clock), "
            f"{best_cpu['bfloat16'] / best_cpu['float32']:.2f} (CPU time)"
        )
    rec.note("gflops_best_cpu uses process CPU time: the undisturbed rate on a shared machine when --threads 1")
    rec.doc["summary"] = {"peak_gflops": best, "peak_gflops_cpu": best_cpu}
    finish(
        rec,
        rec.results,
        ["dtype", "n", "median_s", "min_s", "cpu_min_s", "gflops_median", "gflops_best", "gflops_best_cpu"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

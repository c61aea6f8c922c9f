"""Smoke tests of the benchmark suite: one script end to end in --quick mode, and the helpers it relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from script_loader import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    # a unique module name keeps generic file names (attention.py, backbone.py) from shadowing anything
    return load_script(BENCH / f"{name}.py", f"fiber_bench_{name}")


def test_matmul_peak_quick_writes_the_documented_schema(tmp_path: Path) -> None:
    out = tmp_path / "mm.json"
    cmd = [sys.executable, str(BENCH / "matmul_peak.py"), "--quick", "--sizes", "64", "96", "--repeat", "2"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    common = _load("_common")
    assert set(common.REQUIRED_KEYS) <= set(doc)
    assert doc["benchmark"] == "matmul_peak" and doc["quick"] is True and doc["device"] == "cpu"
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["usable_cores"] >= 1
    assert doc["settings"]["threads"] == 1 and doc["settings"]["repeat"] == 2
    assert len(doc["load_avg_start"]) == 3 and len(doc["load_avg_end"]) == 3
    rows = doc["results"]
    assert [(r["dtype"], r["n"]) for r in rows] == [
        ("float32", 64),
        ("float32", 96),
        ("bfloat16", 64),
        ("bfloat16", 96),
    ]
    for r in rows:
        assert r["flops"] == 2 * r["n"] ** 3
        assert len(r["times_s"]) == 2 and r["min_s"] <= r["median_s"]
        assert r["gflops_best"] == pytest.approx(r["flops"] / r["min_s"] / 1e9)
    assert "dtype" in proc.stdout and "gflops_best" in proc.stdout  # the printed table


def test_count_flops_matches_the_analytic_count() -> None:
    common = _load("_common")
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    assert common.count_flops(lambda: lin(x)) == 2 * 3 * 8 * 4
    # forward + backward of a linear layer: forward, grad-input and grad-weight matmuls of the same size
    assert common.count_flops(lambda: lin(x).sum().backward()) == 3 * (2 * 3 * 8 * 4)


def test_attention_bench_detects_materialised_logits() -> None:
    bench = _load("attention")
    cases = {c["case"]: c for c in bench.build_cases(bench.QUICK, 1, [8], fused_stage=2)}
    window = cases["swin_s0"]
    assert window["kind"] == "window" and window["shift"] and window["m"] == 16
    fwd = bench.make_fn(
        window, bench.make_tensors(window, torch.float32, torch.device("cpu"), False), torch.float32, "sdpa", False
    )
    train_t = bench.make_tensors(window, torch.float32, torch.device("cpu"), True)
    train = bench.make_fn(window, train_t, torch.float32, "sdpa", True)
    # inference: the flash kernel handles the bias without explicit logits
    assert bench.logits_materialised(fwd) is False
    # training with a learnable bias: SDPA has no fused gradient for it on CPU, so logits are explicit
    assert bench.logits_materialised(train) is True
    assert train_t["table"].grad is None  # the step clears its gradients


def test_meter_style_fusion_shapes_and_parameter_count() -> None:
    bench = _load("fusion_placement")
    fusion = bench.MeterStyleFusion(image_dim=24, text_dim=16, dim=16, heads=2, depth=2)
    img, txt = torch.randn(2, 9, 24), torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    x, t = fusion(img, txt, mask)
    assert x.shape == (2, 9, 16) and t.shape == (2, 5, 16)
    d = 16
    # per modality and layer: q (d²+d), kv (2d²+2d), out (d²+d) for SA and CA; FFN 8d²+5d; 3 LayerNorms 6d
    per_half = 2 * (4 * d * d + 4 * d) + (8 * d * d + 5 * d) + 6 * d
    projections = (24 * d + d) + (16 * d + d)
    assert sum(p.numel() for p in fusion.parameters()) == 2 * 2 * per_half + projections
    # padded text keys do not change the image side
    txt2 = txt.clone()
    txt2[1, 3:] = 100.0
    x2, _ = fusion(img, txt2, mask)
    torch.testing.assert_close(x2[1], x[1])

#!/usr/bin/env bash
# One GPU session (issue 18): xformers fallback, a short `fiber-train coarse` run on CUDA, backbone MFU with
# regional torch.compile off/on, the coarse pre-training step and the fine backbone step, in <= ~7 minutes.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine: writes everything under $OUT (or ./gpu_out)
#   DRY=1 PY=.venv/bin/python bash benchmarks/gpu_session.sh   # CPU rehearsal with tiny sizes (tests the script)
#
# Nothing is installed except carried wheels: every *.whl in $WHL_DIR (default .whl) goes into /tmp/site with
# --no-deps, e.g. xformers 0.0.35 (to show the fallback) and lightning-fabric when the image lacks it. The fiber
# packages run from packages/*/src. Each stage has its own `timeout`, and a global budget (BUDGET seconds,
# default 400) shortens or skips the later stages, so one failure or a slow compile never loses the rest.
# Results (at most 8 files, one folder): session.log, summary.tsv, env.txt, backbone_coarse384.json,
# shared_prefix_b32.json, backbone_fine.json, train_tiny.tar.gz.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/session.log
SUMMARY=$OUT/summary.tsv
PY=${PY:-python3}
DRY=${DRY:-0}
BUDGET=${BUDGET:-400}
WHL_DIR=${WHL_DIR:-$ROOT/.whl}
WORK=${WORK:-/tmp/fiber_gpu_session}
T0=$SECONDS
mkdir -p "$WORK"
: >"$LOG"
printf 'stage\trc\tseconds\tlimit_s\n' >"$SUMMARY"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor_cache  # graphs compiled by one stage are reused by the next
SRC=$(ls -d "$ROOT"/packages/*/src | paste -sd:)
export PYTHONPATH=$SRC

log() { echo "[gpu_session +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S CMD...: run CMD under `timeout`, within what is left of the global budget
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - T0)))
    if ((left < 20)); then
        log "SKIP $name: budget spent ($left s left)"
        printf '%s\tskipped\t0\t0\n' "$name" >>"$SUMMARY"
        return 0
    fi
    ((limit > left)) && limit=$left
    log "START $name (limit ${limit}s): $*"
    local s=$SECONDS rc
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
    log "END $name rc=$rc in $((SECONDS - s))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - s))" "$limit" >>"$SUMMARY"
    return 0
}

if [ "$DRY" = 1 ]; then
    DEV=cpu
    ACC=cpu
    BB_COMMON=(--device cpu --dtypes fp32 --modes train --backends sdpa --compile off on --compile-backend eager
        --repeat 1 --warmup 1 --threads 1)
    BB_COARSE=(--configs tiny --batch 2)
    BB_FINE=(--configs tiny --batch 1)
    SP=(--device cpu --quick --batch 2 --only shared --compile on --compile-backend eager)
    TRAIN=(trainer.accelerator=cpu trainer.max_steps=4 trainer.log_every=2 trainer.compile=true
        "trainer.compile_options={backend: eager}" data.synthetic_train=64 data.synthetic_val=8 data.synthetic_test=8)
else
    DEV=cuda
    ACC=cuda
    BB_COMMON=(--device cuda --dtypes bf16 --modes train --backends sdpa --compile off on --repeat 5 --warmup 2)
    BB_COARSE=(--configs coarse384 --batch 32)
    BB_FINE=(--configs fine800x1333 --batch 4)
    SP=(--device cuda --batch 32 --only shared --compile on)
    # the packaged tiny default on CUDA: attention backend auto, trainer.compile auto (on for CUDA)
    TRAIN=(trainer.accelerator=cuda trainer.max_steps=50 trainer.log_every=10 data.synthetic_train=512
        data.synthetic_val=64 data.synthetic_test=64)
fi

# ---------------------------------------------------------------------------------------------- environment
{
    date -u
    echo "mode: $([ "$DRY" = 1 ] && echo DRY-cpu || echo gpu), python: $PY, budget ${BUDGET}s"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"

if ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then
    WANT=()
    for whl in "$WHL_DIR"/*.whl; do
        base=$(basename "$whl")
        mod=${base%%-*}
        # a carried wheel is installed only where the image lacks the module, except xformers (the point of the check)
        if [ "$mod" = xformers ] || ! "$PY" -c "import $mod" 2>/dev/null; then WANT+=("$whl"); fi
    done
    if ((${#WANT[@]})); then
        log "installing carried wheels: ${WANT[*]}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "${WANT[@]}" 2>&1 | tee -a "$LOG"
        export PYTHONPATH=$SRC:$WORK/site
    fi
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt" | tee -a "$LOG"
import importlib
for name in ("torch", "torchvision", "safetensors", "lightning_fabric", "yaml", "tqdm", "PIL", "numpy", "tokenizers",
             "transformers", "timm", "xformers", "fiber_backbones", "fiber_data", "fiber_heads", "fiber_eval", "fiber_train"):
    try:
        mod = importlib.import_module(name)
        print(f"import {name}: ok {getattr(mod, '__version__', '')}")
    except Exception as exc:
        print(f"import {name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
EOF

# ---------------------------------------------------------------------------------------------- stages
# 1. attention backend decisions (xformers probed per case; with the carried non-CUDA wheel: SDPA + reason),
#    the fallback / stand-in tests and the zero-graph-break test
stage info 60 "$PY" -m fiber_backbones.cli info --device "$DEV"
stage pytest 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/backbones/test_backbone_attention.py \
    tests/backbones/test_backbone_attention_fallback.py tests/backbones/test_backbone_compile.py

# 2. the packaged tiny `fiber-train coarse` on the device: auto attention backend, trainer.compile auto
rm -rf "$WORK/runs"
stage train_tiny 150 "$PY" -m fiber_train.cli coarse --data "$WORK/world" --out "$WORK/runs" --run-name tiny \
    --set "${TRAIN[@]}"
if [ -d "$WORK/runs/tiny" ]; then
    tar -czf "$OUT/train_tiny.tar.gz" -C "$WORK/runs/tiny" --exclude=checkpoints --exclude=model . 2>>"$LOG"
fi

# 3. backbone training step, coarse 384 px, batch 32, bf16: eager vs regional compile (MFU)
stage backbone_coarse384 170 "$PY" benchmarks/backbone.py "${BB_COMMON[@]}" "${BB_COARSE[@]}" \
    --out "$OUT/backbone_coarse384.json"

# 4. coarse pre-training step (shared prefix, ITC+ITM+MLM, fused AdamW), batch 32, bf16, compiled
stage shared_prefix_b32 150 "$PY" benchmarks/shared_prefix.py "${SP[@]}" --out "$OUT/shared_prefix_b32.json"

# 5. fine 800x1333 backbone step, batch 4, bf16: eager vs compiled
stage backbone_fine 150 "$PY" benchmarks/backbone.py "${BB_COMMON[@]}" "${BB_FINE[@]}" \
    --out "$OUT/backbone_fine.json"

# ---------------------------------------------------------------------------------------------- summary
log "done in $((SECONDS - T0))s"
cat "$SUMMARY" | tee -a "$LOG"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("*.json")):
    doc = json.loads(path.read_text())
    for r in doc.get("results", []):
        keys = ("config", "mode", "batch", "compile", "median_s", "min_s", "samples_per_s", "mfu_pct", "peak_mem_mib",
                "first_call_s", "error")
        print(path.name, {k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in keys if k in r})
EOF
exit 0

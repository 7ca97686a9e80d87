#!/usr/bin/env bash
# Issue 6's GPU check, as one command for a machine with an NVIDIA GPU, CuPy, PyTorch and pynvml
# (the device tool's: `bash bench/gpu.sh`; docs/gpu.md says what it measures):
#   1. tests/test_backends.py: CPU and GPU give the same logits, losses, counts, checkpoints;
#   2. train.py and generate.py with device cuda: NVML-measured energy beside modeled energy;
#   3. bench/gpu.py: tokens/s, MFU, counts and J/token, CuPy against PyTorch.
# Everything goes under $OUT (default out/gpu); the summary and the benchmark table print last.
# Each part has its own time limit (520 s in all), so one that hangs leaves the others their turn.
# On a fresh machine much of the time goes to CuPy compiling its kernels (cached after).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUPY_TF32=0
PY="${PYTHON:-python3}"
RUN="$(mktemp -d)/tiny"

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see $OUT/nvidia-smi.txt)"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/nvidia-smi.txt"
import importlib
for name in ("numpy", "cupy", "torch", "pynvml"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "unavailable:", e)
EOF

echo "== 1/3 tests/test_backends.py"
timeout 180 $PY -m pytest tests/test_backends.py -v --tb=short -p no:cacheprovider >"$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >>"$OUT/pytest.txt"

echo "== 2/3 train.py and generate.py on the GPU"
PROFILE=$($PY -c "from minigpt.costs import gpu; print(gpu.profile_for(gpu.gpu_name()) or '')")
HARDWARE=()
[ -n "$PROFILE" ] && HARDWARE=(--hardware "$PROFILE")
{
  echo "hardware profile: ${PROFILE:-none matched}"
  timeout 60 $PY train.py configs/tiny.toml --no-progress --set train.device=cuda \
    --set train.max_steps=300 --set "train.out_dir=$RUN" "${HARDWARE[@]}"
  echo "train.py exit $?"
  timeout 40 $PY generate.py "$RUN" --device cuda --prompt "def " --max-new-tokens 1000 \
    --temperature 0 --costs "${HARDWARE[@]}"
  echo "generate.py exit $?"
} >"$OUT/cli_reports.txt" 2>&1

echo "== 3/3 bench/gpu.py"
timeout 240 $PY bench/gpu.py --out "$OUT" --budget-s 180 >"$OUT/gpu_bench.log" 2>&1
echo "bench/gpu.py exit $?" >>"$OUT/gpu_bench.log"

echo
echo "== summary (full logs under $OUT)"
grep -E "passed|failed|error|exit" "$OUT/pytest.txt" | tail -4
grep -E "^FAILED|^ERROR" "$OUT/pytest.txt" | head -20
grep -E "exit|^error|^done|^energy, four|^measured|^time x power|^roofline" "$OUT/cli_reports.txt" | cut -c1-200
tail -3 "$OUT/gpu_bench.log" | grep -E "exit|Error" || true
echo
cat "$OUT/gpu_bench.txt" 2>/dev/null || { echo "no table: the end of gpu_bench.log:"; tail -30 "$OUT/gpu_bench.log"; }

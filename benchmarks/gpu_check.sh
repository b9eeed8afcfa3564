#!/usr/bin/env bash
# The prepared GPU check (issue 13), for a session lent a CUDA machine: the CUDA paths, then the GPU timings.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # ~8 minutes on one H100/H200, plus up to 5 for the adaptive 8B audit
# Needs torch with CUDA, transformers, pydantic, jsonlines and this package (wheel) installed; TransformerLens
# optional (without it the "vs TL" columns are NaN). Everything it prints is also written to OUT_DIR.
set -uo pipefail
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
  | tee "$out/device.txt"
# 1. correctness on CUDA: engine and attribution equal the CPU (tests/test_devices.py, marker gpu)
python -m pytest -q -m gpu tests/test_devices.py 2>&1 | tee "$out/pytest-gpu.txt"
# 2. an audit end to end on the GPU, bf16 and float32, exact and attribution+verify
for dtype in float32 bfloat16; do
  for method in exact attribution+verify; do
    python -m refusal_eval run --device cuda --dtype "$dtype" --method "$method" --quiet --no-pictures \
      --out "$out/audit-$dtype-$method" 2>&1 | tee "$out/audit-$dtype-$method.txt"
  done
done
# 3. timings: random-weight Llama of real dimensions, ours vs TransformerLens in one run
for size in 1b 8b; do
  timeout 240 python benchmarks/bench_patching.py --random-model "$size" --device cuda --dtype bfloat16 \
    --sample 40 --skip-loop 2>&1 | grep -v "Loading weights" | tee "$out/bench-$size-bf16.txt"
done
# 4. the adaptive audit of the random 8B model, replies to statistics (issue 26: target <= 60 s on one H200)
timeout 300 python benchmarks/adaptive_audit.py --random-model 8b --device cuda --dtype bfloat16 --search adaptive \
  2>&1 | grep -v "Loading weights" | tee "$out/adaptive-8b.txt"

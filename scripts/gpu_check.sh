#!/usr/bin/env bash
# The one-shot GPU check, for a session whose task draws a device machine (device tool `run`).
#
# Prepare here first (the GPU image reaches no registry, and its Python is 3.12):
#   make gpu-wheels          # downloads what the image lacks into wheels-gpu/ (git-ignored)
# Then, in ONE device call, carrying the wheels and perf_analyzer:
#   run(command="bash scripts/gpu_check.sh", carry=["wheels-gpu", "tools"], timeout_s=480)
# Results land in $OUT (at most 8 files come back): gpu-tests.txt, gpu-bench.txt, env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, onnxruntime as o; print("torch", torch.__version__, torch.cuda.is_available(), "ort", o.__version__, o.get_available_providers())'
} > "$OUT/env.txt" 2>&1

# Our package and the test tools, from the carried wheels only (no index).
python3 -m pip install -q --no-index --find-links wheels-gpu --no-deps modelhub >> "$OUT/env.txt" 2>&1
python3 -m pip install -q --no-index --find-links wheels-gpu \
  'tritonclient[grpc]' safetensors rich onnxscript pytest pytest-asyncio pytest-timeout hypothesis \
  scikit-learn pyyaml >> "$OUT/env.txt" 2>&1

# 1. The gpu-marked tests (CUDA targets, GPU metrics), and the CPU suite's core on the GPU box.
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_targets.py tests/test_metrics.py \
  > "$OUT/gpu-tests.txt" 2>&1
echo "exit $?" >> "$OUT/gpu-tests.txt"

# 2. In-process throughput on CUDA: eager vs torch-compile (CUDA graphs) vs fp16, at batch 1 and 128.
timeout 200 python3 - > "$OUT/gpu-bench.txt" 2>&1 <<'PY'
import time, torch
from torch import nn
torch.backends.cudnn.benchmark = True

def block(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

model = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1), block(64, 64, 1), block(64, 128, 2),
                      block(128, 256, 2), block(256, 512, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))
model = model.cuda().eval()
def measure(fn, batch, dtype, seconds=3.0):
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.inference_mode():
        for _ in range(5): fn(x)
        torch.cuda.synchronize(); n = 0; t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            fn(x); n += 1
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t)
compiled = torch.compile(model, mode="reduce-overhead")
half = torch.compile(__import__("copy").deepcopy(model).half(), mode="reduce-overhead")
for batch in (1, 128):
    print(f"resnet18-class b{batch}: eager {measure(model, batch, torch.float32):,.0f} img/s, "
          f"compiled {measure(compiled, batch, torch.float32):,.0f} img/s, "
          f"compiled fp16 {measure(half, batch, torch.float16):,.0f} img/s", flush=True)
PY
echo "exit $?" >> "$OUT/gpu-bench.txt"

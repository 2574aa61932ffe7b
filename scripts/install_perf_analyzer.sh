#!/usr/bin/env bash
# Install Triton's real perf_analyzer under tools/perf_analyzer/ (no root needed).
# The PyPI `perf-analyzer` package is a placeholder; the binary ships inside the
# tritonclient 2.41.0 manylinux wheel. It needs libb64 (Debian libb64-0d, unpacked here
# with dpkg -x) and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel), even on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
D=tools/perf_analyzer
PIP=${PIP:-.venv/bin/pip}
[ -x "$D/perf_analyzer" ] && "$D/perf_analyzer" --version >/dev/null 2>&1 && { echo "perf_analyzer: present"; exit 0; }
mkdir -p "$D"
[ -x "$D/tc/bin/perf_analyzer" ] || "$PIP" install -q --no-deps --target "$D/tc" tritonclient==2.41.0
[ -d "$D/cudart/nvidia/cuda_runtime/lib" ] || "$PIP" install -q --no-deps --target "$D/cudart" nvidia-cuda-runtime-cu12
if ! ldconfig -p 2>/dev/null | grep -q libb64.so.0d && [ ! -e "$D/b64/usr/lib/x86_64-linux-gnu/libb64.so.0d" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download libb64-0d >/dev/null)
  dpkg -x "$tmp"/libb64-0d_*.deb "$D/b64"
  rm -rf "$tmp"
fi
cat > "$D/perf_analyzer" <<'EOW'
#!/bin/sh
D=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$D/cudart/nvidia/cuda_runtime/lib:$D/b64/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$D/tc/bin/perf_analyzer" "$@"
EOW
chmod +x "$D/perf_analyzer" "$D/tc/bin/perf_analyzer"
"$D/perf_analyzer" --version

#!/usr/bin/env bash
# make bench: our server against the peers and the two ceilings, in one alternating run.
#
#   1. the peer kit (../shared/bench): set up once, then start echo (the RPC ceiling), MLServer
#      (with and without adaptive batching) and PyTriton (the real Triton core);
#   2. our server eight times, serving the kit's reference models (digits_cnn, mlp_wide) with the
#      same tensor names: "ours" with metrics on (gRPC 9000, REST 9001), "ours_nometrics" with
#      --metrics-port off, "ours_w2" with --workers 2 (two frontend processes computing from their
#      own model copies, one model process keeping the statistics), "ours_w2_shared" with
#      --workers 2 --model-copies none (every request handed to the model process),
#      "ours_noinline" with --inline-compute-us 0 (every batch through a worker thread, for A/B),
#      "ours_nodelay" with --adaptive-delay-us 0 (no adaptive queue delay, for A/B),
#      "ours_threads" with --grpc-server threads (grpcio's thread-pool server, for A/B); and
#      "ours_copies2": two independent servers sharing the ports (--reuse-port), a model copy each;
#      and "floor" (scripts/floor_server.py): the do-nothing grpc.aio server plus the built
#      model's forward, no checks, batcher or accounting: the least any server of ours can cost;
#   3. the kit's closed-loop client over every target, alternating rounds, with server CPU
#      per inference (--cpu); the same over 4 connections per client process for ours, ours_w2,
#      ours_w2_shared, ours_copies2, echo and PyTriton (scripts/loadgen_channels.py); then perf_analyzer;
#   3b. REST: perf_analyzer -i http and -i grpc over ours and PyTriton (HTTP 8300, gRPC 8301),
#      alternating, with server CPU per inference (bench/rest_bench.py); and the two HTTP
#      libraries we measured for the REST frontend (bench/rest_candidates.py);
#   3c. shared memory (issue 16): digits, resnet and pixels (an image in, no compute) over raw gRPC against gRPC with system shared
#      memory (perf_analyzer --shared-memory system), alternating, server CPU per inference;
#   4. the compute ceiling: each model in-process at its best batch size (scripts/ceiling.py);
#   5. text: plugins/embeddings (minilm, BYTES in) under perf_analyzer with real sentences as
#      --input-data, against its own in-process ceiling (no peer serves it).
#
# Results: the kit's tables (printed, and under $PEERS_WORK/results), and bench-results/.
# Knobs: ROUNDS (2), CONCURRENCY (1,4,16,64), WINDOW (3 s), KIT, MODELHUB_BENCH_TARGET (onnx).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
KIT=$(cd "${KIT:-$ROOT/../shared/bench}" && pwd)
export PEERS_WORK=${PEERS_WORK:-$HOME/.cache/modelhub-peers}
ROUNDS=${ROUNDS:-2}
CONCURRENCY=${CONCURRENCY:-1,4,16,64}
WINDOW=${WINDOW:-3}
OUT=$ROOT/bench-results
mkdir -p "$OUT"
REPO=$OUT/models

bash "$KIT/setup.sh" >/dev/null
bash "$KIT/start_servers.sh"

start_ours() {  # start_ours NAME GRPC_PORT METRICS_PORT [FLAGS...]; own process group so --cpu finds it
  local name=$1 grpc=$2 metrics=$3
  shift 3
  setsid env REFMODELS_DIR="$KIT" .venv/bin/modelhub serve --plugins-dir bench/plugins --no-entry-points \
    --model-repository "$REPO" --host 127.0.0.1 --grpc-port "$grpc" --metrics-port "$metrics" --device cpu --threads 1 \
    "$@" > "$OUT/$name.log" 2>&1 < /dev/null &
  echo $! > "$OUT/$name.pid"
}
start_copies() {  # start_copies NAME COPIES GRPC_PORT HTTP_PORT FIRST_METRICS_PORT [FLAGS...]: independent
  # servers sharing the gRPC and REST ports (--reuse-port), metrics on FIRST_METRICS_PORT, +2, ...; one group
  local name=$1 copies=$2 grpc=$3 http=$4 metrics=$5
  shift 5
  setsid bash -c 'n=$1 m=$2; shift 2; for ((i = 0; i < n; i++)); do "$@" --metrics-port $((m + 2 * i)) & done; wait' _ \
    "$copies" "$metrics" env REFMODELS_DIR="$KIT" .venv/bin/modelhub serve --plugins-dir bench/plugins --no-entry-points \
    --model-repository "$REPO" --host 127.0.0.1 --grpc-port "$grpc" --http-port "$http" --device cpu --threads 1 \
    --reuse-port "$@" > "$OUT/$name.log" 2>&1 < /dev/null &
  echo $! > "$OUT/$name.pid"
}
stop_ours() {
  for f in "$OUT"/*.pid; do kill -TERM -- "-$(cat "$f")" 2>/dev/null || true; rm -f "$f"; done
}
trap 'stop_ours; bash "$KIT/stop_servers.sh" >/dev/null 2>&1 || true' EXIT

# Build the artifacts once, before either server starts (they share the repository).
REFMODELS_DIR="$KIT" .venv/bin/python - <<PY
import asyncio
from pathlib import Path
from hub.server import Server, ServerConfig
async def main():
    s = Server(ServerConfig(plugins_dir=Path("bench/plugins"), model_repository=Path("$REPO"), host="127.0.0.1",
                            grpc_port=0, metrics_port=None, device="cpu", threads=1, entry_points=False))
    await s.start(); await s.wait_until_loaded(); await s.stop(0)
asyncio.run(main())
PY
start_ours ours 9000 9002 --http-port 9001
start_ours ours_nometrics 9010 off --http-port off
start_ours ours_w2 9030 9032 --http-port 9031 --workers 2  # two frontends, each its model copies (issue 12)
start_ours ours_w2_shared 9050 9052 --http-port off --workers 2 --model-copies none  # the model process computes all
start_ours ours_noinline 9060 9062 --http-port off --inline-compute-us 0  # every batch through a worker thread
start_ours ours_threads 9070 9072 --http-port off --grpc-server threads  # grpcio's thread-pool server
start_ours ours_nodelay 9080 9082 --http-port off --adaptive-delay-us 0  # no adaptive queue delay
start_copies ours_copies2 2 9040 9041 9042  # two independent servers, each its own model copy (--reuse-port)
setsid env REFMODELS_DIR="$KIT" .venv/bin/python scripts/floor_server.py --port 9095 --plugins-dir bench/plugins \
  --model-repository "$REPO" > "$OUT/floor.log" 2>&1 < /dev/null &  # echo plus the forward
echo $! > "$OUT/floor.pid"

T="--target ours=127.0.0.1:9000:digits_cnn --target ours=127.0.0.1:9000:mlp_wide"
T="$T --target ours_nometrics=127.0.0.1:9010:digits_cnn --target ours_nometrics=127.0.0.1:9010:mlp_wide"
T="$T --target ours_w2=127.0.0.1:9030:digits_cnn --target ours_w2=127.0.0.1:9030:mlp_wide"
T="$T --target ours_w2_shared=127.0.0.1:9050:digits_cnn --target ours_w2_shared=127.0.0.1:9050:mlp_wide"
T="$T --target ours_noinline=127.0.0.1:9060:digits_cnn --target ours_noinline=127.0.0.1:9060:mlp_wide"
T="$T --target ours_threads=127.0.0.1:9070:digits_cnn --target ours_threads=127.0.0.1:9070:mlp_wide"
T="$T --target ours_nodelay=127.0.0.1:9080:digits_cnn --target ours_nodelay=127.0.0.1:9080:mlp_wide"
T="$T --target floor=127.0.0.1:9095:digits_cnn --target floor=127.0.0.1:9095:mlp_wide"
"$PEERS_WORK/venv/client/bin/python" "$KIT/bench.py" --check --wait 120 $T --targets ''
echo "== loadgen (the kit's closed-loop client), server CPU per inference =="
bash "$KIT/run.sh" --cpu --rounds "$ROUNDS" --concurrency "$CONCURRENCY" --window "$WINDOW" $T \
  --out "$OUT/loadgen.jsonl" | tee "$OUT/loadgen.txt"
"$PEERS_WORK/venv/client/bin/python" "$KIT/summarize.py" "$OUT/loadgen.jsonl" --ref echo_grpc_aio \
  | tee "$OUT/loadgen-vs-echo.md"
echo "== several connections: the kit's loadgen over 4 connections (scripts/loadgen_channels.py) =="
# SO_REUSEPORT gives each connection to one process, and the kit's loadgen opens one: it reaches
# one frontend of ours_w2 and one of ours_copies2's servers. Here each client task keeps one of 4.
KITC=$OUT/kit-channels
rm -rf "$KITC" && mkdir -p "$KITC" && ln -s "$KIT"/* "$KITC"/ && rm "$KITC/loadgen.py"
ln -s "$KIT/loadgen.py" "$KITC/loadgen_kit.py" && cp scripts/loadgen_channels.py "$KITC/loadgen.py"
"$PEERS_WORK/venv/client/bin/python" "$KIT/bench.py" --check --wait 120 --targets '' \
  --target ours_copies2=127.0.0.1:9040:digits_cnn --target ours_copies2=127.0.0.1:9040:mlp_wide
LOADGEN_CHANNELS=4 bash "$KITC/run.sh" --cpu --rounds "$ROUNDS" --concurrency "${CHANNELS_CONCURRENCY:-16,64}" \
  --window "$WINDOW" --targets echo_grpc_aio,pytriton_batch2ms \
  --target ours=127.0.0.1:9000:digits_cnn --target ours=127.0.0.1:9000:mlp_wide \
  --target ours_w2=127.0.0.1:9030:digits_cnn --target ours_w2=127.0.0.1:9030:mlp_wide \
  --target ours_w2_shared=127.0.0.1:9050:digits_cnn --target ours_w2_shared=127.0.0.1:9050:mlp_wide \
  --target ours_copies2=127.0.0.1:9040:digits_cnn --target ours_copies2=127.0.0.1:9040:mlp_wide \
  --out "$OUT/loadgen-channels.jsonl" | tee "$OUT/loadgen-channels.txt"
echo "== perf_analyzer =="
bash "$KIT/run.sh" --tool pa --rounds 1 --concurrency "$CONCURRENCY" --window "$WINDOW" \
  --targets echo_grpc_aio,pytriton_batch2ms \
  --target ours=127.0.0.1:9000:digits_cnn --target ours=127.0.0.1:9000:mlp_wide \
  --target ours_threads=127.0.0.1:9070:digits_cnn --target ours_threads=127.0.0.1:9070:mlp_wide \
  --out "$OUT/pa.jsonl" | tee "$OUT/pa.txt"
echo "== REST: perf_analyzer -i http / -i grpc, ours and PyTriton, server CPU per inference =="
.venv/bin/python bench/rest_bench.py --rounds "$ROUNDS" --concurrency "${REST_CONCURRENCY:-16,64}" \
  --window "$((WINDOW * 1000))" --out "$OUT/rest.jsonl" \
  --target ours_http=http:127.0.0.1:9001:digits_cnn:9001 --target ours_grpc=grpc:127.0.0.1:9000:digits_cnn:9001 \
  --target pytriton_http=http:127.0.0.1:8300:digits_cnn:8300 \
  --target pytriton_grpc=grpc:127.0.0.1:8301:digits_cnn:8300 | tee "$OUT/rest.txt"
echo "== REST library candidates: the same echo server in aiohttp and uvicorn+starlette =="
.venv/bin/python bench/rest_candidates.py --rounds "$ROUNDS" --window "$((WINDOW * 1000))" | tee "$OUT/rest-candidates.txt"
echo "== shared memory: raw gRPC against system shared memory, digits and resnet =="
SHM_PLUGINS=$OUT/shm-plugins
mkdir -p "$SHM_PLUGINS" && ln -sfn "$ROOT/plugins/digits" "$SHM_PLUGINS/digits" && ln -sfn "$ROOT/plugins/resnet" "$SHM_PLUGINS/resnet" \
  && ln -sfn "$ROOT/bench/plugins/pixels.py" "$SHM_PLUGINS/pixels.py"
setsid .venv/bin/modelhub serve --plugins-dir "$SHM_PLUGINS" --no-entry-points --model-repository "$REPO" \
  --host 127.0.0.1 --grpc-port 9090 --http-port 9091 --metrics-port off --device cpu --threads 1 \
  --shared-memory system > "$OUT/ours_shm.log" 2>&1 < /dev/null &
echo $! > "$OUT/ours_shm.pid"
for _ in $(seq 600); do
  .venv/bin/modelhub health --url 127.0.0.1:9090 --service resnet >/dev/null 2>&1 && break
  sleep 1
done
.venv/bin/python bench/rest_bench.py --rounds "$ROUNDS" --concurrency "${SHM_CONCURRENCY:-1,16}" \
  --window "$((WINDOW * 1000))" --perf-analyzer tools/perf_analyzer/perf_analyzer --out "$OUT/shm.jsonl" \
  --target digits_grpc=grpc:127.0.0.1:9090:digits:9091 --target digits_shm=grpc+shm:127.0.0.1:9090:digits:9091 \
  --target resnet_grpc=grpc:127.0.0.1:9090:resnet:9091 --target resnet_shm=grpc+shm:127.0.0.1:9090:resnet:9091 \
  --target pixels_grpc=grpc:127.0.0.1:9090:pixels:9091 --target pixels_shm=grpc+shm:127.0.0.1:9090:pixels:9091 \
  | tee "$OUT/shm.txt"
echo "== compute ceiling: in-process, best batch size =="
REFMODELS_DIR="$KIT" .venv/bin/python scripts/ceiling.py --plugins-dir bench/plugins --model-repository "$REPO" \
  | tee "$OUT/ceiling.txt"
echo "== text: minilm (BYTES) under perf_analyzer, and its in-process ceiling =="
TEXT_PLUGINS=$OUT/text-plugins
mkdir -p "$TEXT_PLUGINS" && ln -sfn "$ROOT/plugins/embeddings" "$TEXT_PLUGINS/embeddings"
.venv/bin/python scripts/ceiling.py --plugins-dir "$TEXT_PLUGINS" --model-repository "$REPO" --batch-sizes 1,8,32,64 \
  | tee "$OUT/text-ceiling.txt"
setsid .venv/bin/modelhub serve --plugins-dir "$TEXT_PLUGINS" --no-entry-points --model-repository "$REPO" \
  --host 127.0.0.1 --grpc-port 9020 --http-port off --metrics-port off --device cpu --threads 1 > "$OUT/ours_text.log" 2>&1 < /dev/null &
echo $! > "$OUT/ours_text.pid"
.venv/bin/python - "$OUT/sentences.json" <<'PY'
import json, sys
sys.path.insert(0, "plugins")
from embeddings.sentences import SENTENCES
json.dump({"data": [{"text": [s]} for s in SENTENCES]}, open(sys.argv[1], "w"))
PY
for _ in $(seq 180); do
  .venv/bin/modelhub health --url 127.0.0.1:9020 --service minilm >/dev/null 2>&1 && break
  sleep 1
done
for c in ${CONCURRENCY//,/ }; do
  tools/perf_analyzer/perf_analyzer -m minilm -i grpc -u 127.0.0.1:9020 --input-data "$OUT/sentences.json" \
    --concurrency-range "$c" -p "$((WINDOW * 1000))" -s 50 2>&1 | grep -E "Concurrency:|Avg latency|p99 latency" \
    | tee -a "$OUT/text-pa.txt"
done
echo "results in $OUT"

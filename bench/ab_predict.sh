#!/usr/bin/env bash
# A/B of single-image /predict under hey between two checkouts of camserve (e.g. git worktrees of two
# commits): fresh servers, alternating A B A B ..., bf16, TTA none, each serving its own shipped bundle.
#   C=32 DUR=10 ROUNDS=4 bench/ab_predict.sh /tmp/ab/before /tmp/ab/after
# Prints one line per round and server: images/s, p99 s, the server's CPU per answered request (utime +
# stime; one process, CAMSERVE_WORKERS unset = 1 on 2 cores), status codes. Loopback only; bounded by DUR.
set -u
C=${C:-32}; DUR=${DUR:-10}; ROUNDS=${ROUNDS:-3}
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
TICKS=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime of the one server process
work=$(mktemp -d); pid=; trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; rm -rf "$work"' EXIT
IMG=$(ls "$1"/models/cifar10-resnet/misclassified/*.png | head -1)
"$PY" - "$IMG" > "$work/body.bin" <<'PY'
import sys; d=open(sys.argv[1],'rb').read()
sys.stdout.buffer.write(b'--XB\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'+d+b'\r\n--XB--\r\n')
PY
for r in $(seq "$ROUNDS"); do
  for tree in "$@"; do
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    pushd "$tree" >/dev/null
    CAMSERVE_PORT=$port CAMSERVE_TTA=none CAMSERVE_PRECISION=bf16 CAMSERVE_LOG_REQUESTS=false \
      CAMSERVE_MODEL_DIR="$tree/models/cifar10-resnet" "$PY" -m service >"$work/server.log" 2>&1 &
    pid=$!
    popd >/dev/null
    for _ in $(seq 240); do curl -sf "localhost:$port/readyz" >/dev/null && break; sleep 0.5; done
    if ! kill -0 "$pid" 2>/dev/null || ! curl -sf "localhost:$port/readyz" >/dev/null; then
      echo "round $r $(basename "$tree"): the server did not become ready; its log:"; tail -20 "$work/server.log"; continue
    fi
    hey -z 2s -c "$C" -m POST -T "multipart/form-data; boundary=XB" -D "$work/body.bin" "http://127.0.0.1:$port/predict" >/dev/null
    cpu0=$(cpu_ticks "$pid")
    out=$(hey -z "${DUR}s" -c "$C" -m POST -T "multipart/form-data; boundary=XB" -D "$work/body.bin" "http://127.0.0.1:$port/predict")
    cpu1=$(cpu_ticks "$pid")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}'); p99=$(echo "$out" | awk '/99% in/ {print $3}')
    codes=$(echo "$out" | grep -A3 "Status code" | tail -n +2 | tr -s ' ' | tr '\n' ' ')
    ok=$(echo "$out" | awk '/\[200\]/ {print $2}')
    cpu_us=$(( (cpu1 - cpu0) * 1000000 / TICKS / ${ok:-1} ))
    echo "round $r $(basename "$tree") c=$C rps=$rps p99=$p99 server_cpu_us_per_request=$cpu_us codes: $codes"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null; sleep 2
  done
done

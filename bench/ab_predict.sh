#!/usr/bin/env bash
# A/B of single-image /predict under hey between two checkouts of camserve (e.g. git worktrees of two
# commits): fresh servers, alternating A B A B ..., bf16, TTA none, each serving its own shipped bundle.
#   C=32 DUR=10 ROUNDS=4 bench/ab_predict.sh /tmp/ab/before /tmp/ab/after
# Prints one line per round and server: images/s, p99 s, status codes. Loopback only; bounded by DUR.
set -u
C=${C:-32}; DUR=${DUR:-10}; ROUNDS=${ROUNDS:-3}
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
work=$(mktemp -d); trap 'pkill -TERM -f "python -m service" 2>/dev/null; rm -rf "$work"' EXIT
IMG=$(ls "$1"/models/cifar10-resnet/misclassified/*.png | head -1)
"$PY" - "$IMG" > "$work/body.bin" <<'PY'
import sys; d=open(sys.argv[1],'rb').read()
sys.stdout.buffer.write(b'--XB\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'+d+b'\r\n--XB--\r\n')
PY
for r in $(seq "$ROUNDS"); do
  for tree in "$@"; do
    port=$((20000 + RANDOM % 20000))
    (cd "$tree"; CAMSERVE_PORT=$port CAMSERVE_TTA=none CAMSERVE_PRECISION=bf16 CAMSERVE_LOG_REQUESTS=false \
      CAMSERVE_MODEL_DIR="$tree/models/cifar10-resnet" "$PY" -m service >"$work/server.log" 2>&1 &)
    for _ in $(seq 240); do curl -sf "localhost:$port/readyz" >/dev/null && break; sleep 0.5; done
    hey -z 2s -c "$C" -m POST -T "multipart/form-data; boundary=XB" -D "$work/body.bin" "http://127.0.0.1:$port/predict" >/dev/null
    out=$(hey -z "${DUR}s" -c "$C" -m POST -T "multipart/form-data; boundary=XB" -D "$work/body.bin" "http://127.0.0.1:$port/predict")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}'); p99=$(echo "$out" | awk '/99% in/ {print $3}')
    codes=$(echo "$out" | grep -A3 "Status code" | tail -n +2 | tr -s ' ' | tr '\n' ' ')
    echo "round $r $(basename "$tree") c=$C rps=$rps p99=$p99 codes: $codes"
    pkill -TERM -f "python -m service"; sleep 3
  done
done

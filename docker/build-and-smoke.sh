#!/usr/bin/env bash
# Build the camserve image with podman and smoke-test the running container for real.
#
#   sudo docker/build-and-smoke.sh            # everything: setup, base, build, smoke
#   sudo docker/build-and-smoke.sh setup      # podman, runc, debootstrap + their config only
#   sudo docker/build-and-smoke.sh base       # ... + the local Debian bookworm base image
#   sudo docker/build-and-smoke.sh build      # ... + the camserve image
#   sudo docker/build-and-smoke.sh clean      # remove containers, images and podman storage
#
# Made for a machine with no Docker daemon and no registry to pull from (CI here):
#   * podman, runc and debootstrap come from Debian's packages;
#   * podman's config lives in $CAMSERVE_PODMAN_STATE (containers.conf: runc, cgroupfs, file
#     events, nofile=20000; storage.conf: vfs), selected with CONTAINERS_CONF and
#     CONTAINERS_STORAGE_CONF, so the machine's own podman setup is left alone;
#   * the base image is `debootstrap --variant=minbase bookworm`, cached in $CAMSERVE_BASE_DIR and
#     `podman import`ed; the Dockerfile apt-installs python3.11 into it;
#   * pip inside the build uses the same package sources as this machine's pip (`pip config
#     list`): the script writes them into a pip.conf and bind-mounts it and every local directory
#     it names (find-links, file:// indexes, constraints, CA bundle) read-only into the build.
#     Where pip has no such config this is a no-op and the build uses PyPI.
#
# The smoke test starts the image with --network host on a free port, waits for the image's own
# HEALTHCHECK (GET /readyz) to pass, checks /livez /readyz /health, POSTs one of the bundle's
# misclassified test PNGs to /predict and /gradcam and checks the top-1 label against model.json's
# `predicted_label`, checks the process runs as non-root without Lightning/torchvision, repeats
# with the bundle mounted from the host via CAMSERVE_MODEL_DIR, stops the container with SIGTERM
# and requires exit code 0, and prints the image size.
#
# Environment:
#   CAMSERVE_PODMAN_STATE   podman config + storage   (default /var/tmp/camserve-podman)
#   CAMSERVE_BASE_DIR       debootstrap cache          (default /var/tmp/camserve-base)
#   CAMSERVE_DEBIAN_MIRROR  Debian mirror              (default http://deb.debian.org/debian)
#   CAMSERVE_IMAGE          image tag                  (default localhost/camserve:smoke)
#   CAMSERVE_PODMAN_LAYERS  podman build --layers      (default false: vfs stores every layer as
#                           a full copy, and the venv alone is ~5.5 GB)
#   CAMSERVE_SMOKE_OVERRIDE 0 skips the mounted-bundle run
#   CAMSERVE_SMOKE_PRUNE    1 prunes podman storage afterwards (also done when < 20 GB are free)
#   CAMSERVE_STARTUP_TIMEOUT seconds to wait for healthy (default 600)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PHASE=${1:-all}
STATE=${CAMSERVE_PODMAN_STATE:-/var/tmp/camserve-podman}
BASE_DIR=${CAMSERVE_BASE_DIR:-/var/tmp/camserve-base}
MIRROR=${CAMSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/camserve-base:bookworm
IMAGE=${CAMSERVE_IMAGE:-localhost/camserve:smoke}
LAYERS=${CAMSERVE_PODMAN_LAYERS:-false}
STARTUP_TIMEOUT=${CAMSERVE_STARTUP_TIMEOUT:-600}
BUNDLE=models/cifar10-resnet
CONTAINER=camserve-smoke
# Builds are heavy; keep them out of the way of anything else running on the machine.
NICE=(nice -n 19 ionice -c3)

log() { printf '[smoke %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "FAIL: $*"; exit 1; }

case "$PHASE" in setup|base|build|smoke|all|clean) ;; *) die "unknown phase '$PHASE'";; esac
[ "$(id -u)" = 0 ] || die "run as root (rootful podman with chroot isolation)"

# --- setup: tools and podman configuration ------------------------------------------------------
setup() {
  local missing=()
  for tool in podman runc debootstrap curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian's packages"
    "${NICE[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${NICE[@]}" apt-get install -y -qq --no-install-recommends \
      podman runc debootstrap curl ca-certificates >/dev/null
  fi
  mkdir -p "$STATE/storage" "$STATE/run" "$STATE/pip"
  cat >"$STATE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$STATE/events.log"
EOF
  cat >"$STATE/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$STATE/storage"
runroot = "$STATE/run"
EOF
  export CONTAINERS_CONF="$STATE/containers.conf" CONTAINERS_STORAGE_CONF="$STATE/storage.conf"
  log "$(podman --version), $(runc --version | head -1), storage $(podman info --format '{{.Store.GraphDriverName}}') in $STATE"
}

# --- base: debootstrap bookworm -> podman import ------------------------------------------------
base() {
  if podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE present"
    return
  fi
  local rootfs="$BASE_DIR/rootfs"
  if [ ! -f "$BASE_DIR/.complete" ]; then
    log "debootstrap --variant=minbase bookworm -> $rootfs"
    rm -rf "$rootfs"
    mkdir -p "$BASE_DIR"
    "${NICE[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$BASE_DIR/debootstrap.log" 2>&1 \
      || { tail -20 "$BASE_DIR/debootstrap.log"; die "debootstrap failed"; }
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
    rm -f "$rootfs"/var/cache/apt/archives/*.deb
    rm -rf "$rootfs"/var/lib/apt/lists/*
    touch "$BASE_DIR/.complete"
  fi
  log "podman import $rootfs -> $BASE_IMAGE"
  tar -C "$rootfs" --numeric-owner -cf - . \
    | podman import --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$BASE_IMAGE" >/dev/null
  log "base image $BASE_IMAGE: $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | numfmt --to=iec)"
}

# --- build ---------------------------------------------------------------------------------------
# pip's effective configuration on this machine as one pip.conf, plus a -v for each local path in it.
PIP_MOUNTS=()
pip_sources() {
  local pip_cmd
  if [ -x "$ROOT/.venv/bin/pip" ]; then pip_cmd="$ROOT/.venv/bin/pip"; else pip_cmd="python3 -m pip"; fi
  local conf="$STATE/pip/pip.conf"
  # `pip config list` prints `<scope>.<key>='<value>'`; environment (:env:) wins over files.
  $pip_cmd config list 2>/dev/null | python3 -c '
import re, sys
values = {}
for line in sys.stdin:
    m = re.match(r"^(:env:|global|user|site|install|wheel|download)\.([\w-]+)=(.*)$", line.strip())
    if not m:
        continue
    scope, key, value = m.groups()
    value = value.strip("\x27\"")
    if scope in ("global", ":env:") and (scope == ":env:" or key not in values):
        values[key] = value
print("[global]")
for key, value in sorted(values.items()):
    print(f"{key} = {value}")
' >"$conf"
  local -A seen=()
  local token path
  for token in $(sed -n 's/^[a-z-]* = //p' "$conf"); do
    path=${token#file://}
    [[ "$path" == /* && -e "$path" ]] || continue
    # a file:// index's pages link to ../../files, so mount the folder above `simple`
    if [[ -d "$path" && "$(basename "$path")" == simple ]]; then path=$(dirname "$path"); fi
    [[ -n "${seen[$path]:-}" ]] && continue
    seen[$path]=1
    PIP_MOUNTS+=(-v "$path:$path:ro")
  done
  PIP_MOUNTS+=(-v "$STATE/pip:/run/camserve-pip:ro")
  log "pip sources for the build: $(grep -v '^\[' "$conf" | tr '\n' ';')"
}

build() {
  [ -f "$ROOT/$BUNDLE/model.json" ] || die "$BUNDLE/model.json is missing: export a bundle first"
  [ -f "$ROOT/README.md" ] || die "README.md is missing (pyproject.toml's readme)"
  pip_sources
  local avail
  avail=$(df --output=avail -BG "$STATE" | tail -1 | tr -dc 0-9)
  log "building $IMAGE (layers=$LAYERS, ${avail} GB free under $STATE)"
  local started=$SECONDS
  "${NICE[@]}" podman build \
    --isolation chroot \
    --format docker \
    --pull=never \
    --layers="$LAYERS" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg PIP_CONFIG_FILE=/run/camserve-pip/pip.conf \
    "${PIP_MOUNTS[@]}" \
    -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$STATE/build.log" 2>&1 \
    || { tail -40 "$STATE/build.log"; die "podman build failed (full log: $STATE/build.log)"; }
  grep -E '^(STEP|COMMIT|Successfully)' "$STATE/build.log" | sed 's/^/  /'
  log "built $IMAGE in $((SECONDS - started)) s"
}

# --- smoke ---------------------------------------------------------------------------------------
PORT=
cleanup_container() { podman rm -f -t 5 "$1" >/dev/null 2>&1 || true; }
on_exit() {
  local rc=$?
  if [ "$rc" != 0 ] && podman container exists "$CONTAINER" 2>/dev/null; then
    log "container logs (last 40 lines):"
    podman logs --tail 40 "$CONTAINER" 2>&1 | sed 's/^/  /' || true
  fi
  cleanup_container "$CONTAINER"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_and_wait() {  # start_and_wait <extra podman run args...>
  PORT=$(free_port)
  cleanup_container "$CONTAINER"
  podman run -d --name "$CONTAINER" --network host -e CAMSERVE_PORT="$PORT" "$@" "$IMAGE" >/dev/null
  log "started $CONTAINER on port $PORT; waiting for the image's HEALTHCHECK (GET /readyz)"
  local started=$SECONDS
  until podman healthcheck run "$CONTAINER" >/dev/null 2>&1; do
    [ "$(podman inspect --format '{{.State.Status}}' "$CONTAINER")" = running ] \
      || die "container exited (code $(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")) before it was healthy"
    ((SECONDS - started < STARTUP_TIMEOUT)) || die "not healthy after ${STARTUP_TIMEOUT} s"
    sleep 2
  done
  log "healthy after $((SECONDS - started)) s: health status '$(podman inspect --format '{{.State.Health.Status}}' "$CONTAINER")'"
}

check_endpoints() {
  local url="http://127.0.0.1:$PORT" path code
  for path in /livez /readyz /health; do
    code=$(curl -s -o "$STATE/resp$(tr / _ <<<"$path").json" -w '%{http_code}' "$url$path")
    [ "$code" = 200 ] || die "GET $path -> $code"
    log "GET $path -> 200 $(head -c 300 "$STATE/resp$(tr / _ <<<"$path").json")"
  done
}

# Picks a misclassified test image from model.json: prints "<png path>\t<true>\t<predicted>".
pick_image() {
  python3 - "$ROOT/$BUNDLE" <<'EOF'
import json, sys
from pathlib import Path
bundle = Path(sys.argv[1])
meta = json.loads((bundle / "model.json").read_text())
entries = meta.get("misclassified") or []
if not entries:
    sys.exit("model.json lists no misclassified images")
for entry in entries:
    path = bundle / entry["file"]
    if not path.is_file():
        path = bundle / "misclassified" / Path(entry["file"]).name
    if path.is_file():
        print(f"{path}\t{entry['true_label']}\t{entry['predicted_label']}")
        break
else:
    sys.exit("none of model.json's misclassified files exist")
EOF
}

# Top-1 label of the first (only) image in a /predict or /gradcam JSON answer.
top1_label() {
  python3 - "$1" <<'EOF'
import json, sys
answer = json.load(open(sys.argv[1]))
LABEL_KEYS = ("label", "predicted_label", "class", "class_name", "top1")

def first_item(obj):
    if isinstance(obj, dict):
        for key in ("predictions", "results", "items", "explanations", "images"):
            if isinstance(obj.get(key), list) and obj[key]:
                return obj[key][0]
    if isinstance(obj, list) and obj:
        return obj[0]
    return obj

def label_of(item):
    if isinstance(item, dict):
        for key in LABEL_KEYS:
            value = item.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, dict) and isinstance(value.get("label"), str):
                return value["label"]
        for key in ("top", "topk", "top_k", "probabilities", "scores"):
            value = item.get(key)
            if isinstance(value, list) and value:
                found = label_of(value[0])
                if found:
                    return found
            if isinstance(value, dict) and value:  # {label: probability}
                return max(value, key=value.get)
        for key in ("prediction", "predicted"):
            found = label_of(item.get(key))
            if found:
                return found
    return None

label = label_of(first_item(answer))
if label is None:
    sys.exit(f"no label found in {json.dumps(answer)[:400]}")
print(label)
EOF
}

check_predict_and_gradcam() {
  local url="http://127.0.0.1:$PORT" picked png true_label expected code got
  picked=$(pick_image)
  IFS=$'\t' read -r png true_label expected <<<"$picked"
  log "test image ${png#"$ROOT"/}: true '$true_label', bundle says predicted '$expected'"

  code=$(curl -s -o "$STATE/predict.json" -w '%{http_code}' -F "files=@$png;type=image/png" "$url/predict")
  [ "$code" = 200 ] || die "POST /predict -> $code: $(head -c 400 "$STATE/predict.json")"
  got=$(top1_label "$STATE/predict.json")
  log "POST /predict -> 200, top-1 '$got': $(head -c 300 "$STATE/predict.json")"
  [ "$got" = "$expected" ] || die "/predict top-1 '$got' != model.json predicted_label '$expected'"

  code=$(curl -s -o "$STATE/gradcam.out" -D "$STATE/gradcam.headers" -w '%{http_code}' \
    -F "files=@$png;type=image/png" "$url/gradcam")
  [ "$code" = 200 ] || die "POST /gradcam -> $code: $(head -c 400 "$STATE/gradcam.out")"
  local ctype size
  ctype=$(sed -n 's/^content-type: *//Ip' "$STATE/gradcam.headers" | tr -d '\r' | tail -1)
  size=$(stat -c %s "$STATE/gradcam.out")
  [ "$size" -gt 100 ] || die "/gradcam answered only $size bytes"
  if [[ "$ctype" == application/json* ]]; then
    got=$(top1_label "$STATE/gradcam.out")
    [ "$got" = "$expected" ] || die "/gradcam label '$got' != model.json predicted_label '$expected'"
    python3 - "$STATE/gradcam.out" <<'EOF' || die "/gradcam answer carries no image"
import json, sys
text = json.dumps(json.load(open(sys.argv[1])))
# a heatmap or overlay comes back as a base64 PNG (or a data: URL), or as a grid of numbers
sys.exit(0 if ("iVBORw0KGgo" in text or "data:image/" in text or "heatmap" in text or "cam" in text) else 1)
EOF
    log "POST /gradcam -> 200 ($ctype, $size bytes), label '$got'"
  else
    [[ "$ctype" == image/* || "$ctype" == multipart/* || "$ctype" == application/zip* ]] \
      || die "/gradcam answered with content-type '$ctype'"
    log "POST /gradcam -> 200 ($ctype, $size bytes)"
  fi
}

check_inside() {
  local uid
  uid=$(podman exec "$CONTAINER" id -u)
  [ "$uid" != 0 ] || die "the service runs as root"
  podman exec "$CONTAINER" python -c 'import importlib.util as u, sys; bad = [m for m in ("lightning", "pytorch_lightning", "torchvision") if u.find_spec(m)]; sys.exit(f"training packages present: {bad}" if bad else 0)' \
    || die "training-only packages in the image"
  log "inside: uid $uid, PID 1 '$(podman exec "$CONTAINER" cat /proc/1/comm)', python $(podman exec "$CONTAINER" python -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'), no Lightning/torchvision"
}

stop_and_check() {
  local started=$SECONDS code
  log "podman stop -t 30 (SIGTERM)"
  podman stop -t 30 "$CONTAINER" >/dev/null
  code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
  log "container exited with code $code after $((SECONDS - started)) s; last log lines:"
  podman logs --tail 6 "$CONTAINER" 2>&1 | sed 's/^/  /'
  [ "$code" = 0 ] || die "exit code $code after SIGTERM (expected 0: graceful shutdown)"
}

smoke() {
  [ -f "$ROOT/$BUNDLE/model.json" ] || die "$BUNDLE/model.json is missing"
  podman image exists "$IMAGE" || die "no image $IMAGE: run the build phase"
  trap on_exit EXIT

  log "=== run 1: the bundle baked into the image"
  start_and_wait
  check_endpoints
  check_predict_and_gradcam
  check_inside
  stop_and_check
  cleanup_container "$CONTAINER"

  if [ "${CAMSERVE_SMOKE_OVERRIDE:-1}" != 0 ]; then
    log "=== run 2: the bundle mounted from the host, CAMSERVE_MODEL_DIR=/models/override"
    start_and_wait -v "$ROOT/$BUNDLE:/models/override:ro" -e CAMSERVE_MODEL_DIR=/models/override
    check_endpoints
    check_predict_and_gradcam
    stop_and_check
    cleanup_container "$CONTAINER"
  fi

  local bytes
  bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  log "image $IMAGE: $bytes bytes ($(numfmt --to=iec --suffix=B "$bytes"))"
  podman images --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | sed 's/^/  /'
  log "SMOKE PASSED"
}

clean() {
  podman rm -af -t 5 >/dev/null 2>&1 || true
  podman system prune -af >/dev/null
  log "podman storage pruned: $(du -sh "$STATE/storage" 2>/dev/null | cut -f1) left in $STATE/storage"
}

maybe_prune() {
  local avail
  avail=$(df --output=avail -BG "$STATE" | tail -1 | tr -dc 0-9)
  if [ "${CAMSERVE_SMOKE_PRUNE:-0}" = 1 ] || [ "$avail" -lt 20 ]; then
    log "pruning podman storage (${avail} GB free)"
    clean
  fi
}

setup
case "$PHASE" in
  setup) ;;
  base) base ;;
  build) base; build ;;
  smoke) smoke; maybe_prune ;;
  all) base; build; smoke; maybe_prune ;;
  clean) clean ;;
esac

#!/usr/bin/env bash
# Build the camserve images (the default one with the CUDA build of torch, and the CPU-only one,
# Dockerfile TORCH_VARIANT=cpu) with podman and smoke-test each running container for real.
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
#     events, nofile=20000, nproc=32768; storage.conf: vfs), selected with CONTAINERS_CONF and
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
# `predicted_label`, checks /health's runtime and precision (the CPU image: OpenVINO at INT8; the CUDA
# image: torch), checks the process runs as non-root without Lightning/torchvision (and, in the
# CPU image, with a torch that has no CUDA), checks the Open Inference Protocol's health and model
# metadata paths, repeats with the bundle mounted from the host via CAMSERVE_MODEL_DIR, stops the
# container with SIGTERM and requires exit code 0; then it prints both images' sizes.
#
# Environment:
#   CAMSERVE_PODMAN_STATE   podman config + storage   (default /var/tmp/camserve-podman)
#   CAMSERVE_BASE_DIR       debootstrap cache          (default /var/tmp/camserve-base)
#   CAMSERVE_DEBIAN_MIRROR  Debian mirror              (default http://deb.debian.org/debian)
#   CAMSERVE_IMAGE          image tag                  (default localhost/camserve:smoke; the CPU
#                           image is tagged <tag>-cpu)
#   CAMSERVE_VARIANTS       which images               (default "cuda cpu")
#   CAMSERVE_TORCH_CPU_INDEX_URL  the CPU image's torch index (default empty: the package sources
#                           of this machine's pip, as above; elsewhere PyTorch's CPU index,
#                           https://download.pytorch.org/whl/cpu, the Dockerfile's default)
#   CAMSERVE_TORCH_CPU_VERSION    the CPU image's torch (default: the newest torch-*+cpu wheel in
#                           pip's find-links folders, where the index is pip's own (on this
#                           project's machines 2.13.0+cpu); otherwise requirements/serve.lock's pin)
#   CAMSERVE_PODMAN_LAYERS  podman build --layers      (default false: vfs stores every layer as
#                           a full copy, and the venv alone is ~5.5 GB)
#   CAMSERVE_SMOKE_OVERRIDE 0 skips the second run (mounted bundle, read-only root, no
#                           capabilities, 3 GB / 2 CPU limits, as in compose.yaml and k8s.yaml)
#   CAMSERVE_SMOKE_PRUNE    1 prunes podman storage afterwards (also done when < 20 GB are free)
#   CAMSERVE_STARTUP_TIMEOUT seconds to wait for healthy (default 600)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PHASE=${1:-all}
STATE=${CAMSERVE_PODMAN_STATE:-/var/tmp/camserve-podman}
BASE_DIR=${CAMSERVE_BASE_DIR:-/var/tmp/camserve-base}
MIRROR=${CAMSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/camserve-base:bookworm
IMAGE_BASE=${CAMSERVE_IMAGE:-localhost/camserve:smoke}
IMAGE=$IMAGE_BASE
VARIANTS=${CAMSERVE_VARIANTS:-cuda cpu}
TORCH_CPU_INDEX_URL=${CAMSERVE_TORCH_CPU_INDEX_URL-}
TORCH_CPU_VERSION=${CAMSERVE_TORCH_CPU_VERSION-}
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
  # nproc: rootful podman otherwise asks runc for RLIMIT_NPROC=4194304, which a sandbox without
  # CAP_SYS_RESOURCE refuses ("error setting rlimit type 6: operation not permitted"); 32768 was
  # the highest value runc could set in this project's CI sandbox.
  cat >"$STATE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
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
    local mnt  # an interrupted debootstrap can leave these mounted
    for mnt in proc sys dev/pts; do
      if mountpoint -q "$rootfs/$mnt" 2>/dev/null; then umount -l "$rootfs/$mnt"; fi
    done
    rm -rf --one-file-system "$rootfs"
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
  tar -C "$rootfs" --numeric-owner --one-file-system -cf - . \
    | podman import --quiet --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
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
  # Folders (find-links, file:// indexes) are mounted at the same path; single files (constraints,
  # CA bundle) are copied next to pip.conf instead, so that they cannot collide with files the
  # build itself installs (ca-certificates writes /etc/ssl/certs/ca-certificates.crt).
  local -A seen=()
  local token path copy
  # shellcheck disable=SC2013  # values are whitespace-separated lists (extra-index-url): words
  for token in $(sed -n 's/^[a-z-]* = //p' "$conf"); do
    path=${token#file://}
    [[ "$path" == /* && -e "$path" ]] || continue
    if [ -f "$path" ]; then
      copy="$(basename "$(dirname "$path")")-$(basename "$path")"
      cp "$path" "$STATE/pip/$copy"
      sed -i "s#$token#/run/camserve-pip/$copy#" "$conf"
      continue
    fi
    # a file:// index's pages link to ../../files, so mount the folder above `simple`
    if [[ "$(basename "$path")" == simple ]]; then path=$(dirname "$path"); fi
    [[ -n "${seen[$path]:-}" ]] && continue
    seen[$path]=1
    PIP_MOUNTS+=(-v "$path:$path:ro")
  done
  PIP_MOUNTS+=(-v "$STATE/pip:/run/camserve-pip:ro")
  log "pip sources for the build: $(grep -v '^\[' "$conf" | tr '\n' ';')"
}

image_of() { if [ "$1" = cuda ]; then echo "$IMAGE_BASE"; else echo "$IMAGE_BASE-$1"; fi; }

# The version of the newest torch-*+cpu wheel in pip's find-links folders (pip_sources ran), or nothing.
cpu_torch_on_disk() {
  local dir wheel
  for dir in $(sed -n 's/^find-links = //p' "$STATE/pip/pip.conf"); do
    wheel=$(find "$dir" -maxdepth 1 -name 'torch-*+cpu-*.whl' -printf '%f\n' 2>/dev/null | sort -V | tail -1)
    if [ -n "$wheel" ]; then cut -d- -f2 <<<"$wheel"; return; fi
  done
}

build() {
  local variant
  pip_sources
  if [ -z "$TORCH_CPU_INDEX_URL" ] && [ -z "$TORCH_CPU_VERSION" ]; then
    TORCH_CPU_VERSION=$(cpu_torch_on_disk)
    [ -z "$TORCH_CPU_VERSION" ] || log "CPU image: torch $TORCH_CPU_VERSION, the CPU wheel in pip's find-links"
  fi
  for variant in $VARIANTS; do
    IMAGE=$(image_of "$variant") build_one "$variant"
  done
}

build_one() {  # build_one <cuda|cpu>, tagged $IMAGE
  [ -f "$ROOT/$BUNDLE/model.json" ] || die "$BUNDLE/model.json is missing: export a bundle first"
  [ -f "$ROOT/README.md" ] || die "README.md is missing (pyproject.toml's readme)"
  # an interrupted build leaves buildah working containers behind (GBs each on vfs); this storage
  # is the script's own, so anything external in it is such a leftover
  local stale
  stale=$(podman ps -a --external --format '{{.ID}} {{.Command}}' | awk '$2 == "buildah" {print $1}')
  if [ -n "$stale" ]; then
    log "removing build containers left by an interrupted build: $(echo "$stale" | tr '\n' ' ')"
    # shellcheck disable=SC2086  # one ID per word
    podman rm -f $stale >/dev/null 2>&1 || true
  fi
  local avail
  avail=$(df --output=avail -BG "$STATE" | tail -1 | tr -dc 0-9)
  log "building $IMAGE (torch $1, layers=$LAYERS, ${avail} GB free under $STATE)"
  local started=$SECONDS
  "${NICE[@]}" podman build \
    --isolation chroot \
    --format docker \
    --pull=never \
    --layers="$LAYERS" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg PIP_CONFIG_FILE=/run/camserve-pip/pip.conf \
    --build-arg TORCH_VARIANT="$1" \
    --build-arg TORCH_CPU_INDEX_URL="$TORCH_CPU_INDEX_URL" \
    --build-arg TORCH_CPU_VERSION="$TORCH_CPU_VERSION" \
    "${PIP_MOUNTS[@]}" \
    -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$STATE/build.log" 2>&1 \
    || { tail -40 "$STATE/build.log"; die "podman build failed (full log: $STATE/build.log)"; }
  grep -E '^(STEP|COMMIT|Successfully)' "$STATE/build.log" | sed 's/^/  /'
  log "built $IMAGE in $((SECONDS - started)) s"
  podman image prune -f >/dev/null  # an earlier build's image, now untagged (vfs: GBs each)
}

# --- smoke ---------------------------------------------------------------------------------------
PORT=
# Without systemd, podman cannot schedule the HEALTHCHECK timer and says so on every run/stop; the
# script runs the image's HEALTHCHECK itself (podman healthcheck run), so drop those lines.
quiet_systemd() { "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }
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
  GRPC_PORT=$(free_port)  # host network: never the default 8001, which another server may hold
  cleanup_container "$CONTAINER"
  quiet_systemd podman run -d --name "$CONTAINER" --network host -e CAMSERVE_PORT="$PORT" \
    -e CAMSERVE_GRPC_PORT="$GRPC_PORT" "$@" "$IMAGE" >/dev/null
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

# Picks a misclassified test image from model.json, the most confident one (so that reduced
# precision on the serving side cannot flip it): prints "<png path>\t<true>\t<predicted>".
pick_image() {
  python3 - "$ROOT/$BUNDLE" <<'EOF'
import json, sys
from pathlib import Path
bundle = Path(sys.argv[1])
meta = json.loads((bundle / "model.json").read_text())
entries = meta.get("misclassified") or []
if not entries:
    sys.exit("model.json lists no misclassified images")
for entry in sorted(entries, key=lambda e: -float(e.get("confidence", 0))):
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

# Top-1 label of the first (only) image in a /predict or /gradcam answer (service/schemas.py):
# PredictResponse.predictions[0].top_k[0].label, GradcamResponse.results[0].label (whose overlay_png
# must be a base64 PNG and heatmap a square grid of values in [0, 1]).
top1_label() {
  python3 - "$1" "$2" <<'EOF'
import base64, json, sys
kind, answer = sys.argv[1], json.load(open(sys.argv[2]))
if kind == "predict":
    top = answer["predictions"][0]["top_k"]
    probs = [entry["probability"] for entry in top]
    assert probs == sorted(probs, reverse=True), f"top_k not sorted: {probs}"
    print(top[0]["label"])
else:
    result = answer["results"][0]
    png = base64.b64decode(result["overlay_png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), "overlay_png is not a PNG"
    heatmap = result["heatmap"]
    assert heatmap and all(len(row) == len(heatmap) for row in heatmap), "heatmap is not square"
    assert all(0.0 <= v <= 1.0 for row in heatmap for v in row), "heatmap values outside [0, 1]"
    print(result["label"])
EOF
}

check_open_inference_protocol() {
  local url="http://127.0.0.1:$PORT" path code name
  name=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("name", ""))' "$ROOT/$BUNDLE/model.json")
  for path in /v2 /v2/health/live /v2/health/ready "/v2/models/$name" "/v2/models/$name/ready"; do
    code=$(curl -s -o "$STATE/oip.json" -w '%{http_code}' "$url$path")
    [ "$code" = 200 ] || die "GET $path -> $code: $(head -c 300 "$STATE/oip.json")"
  done
  log "Open Inference Protocol: /v2, health and model $name metadata -> 200 $(head -c 200 "$STATE/oip.json")"
}

check_predict_and_gradcam() {
  local url="http://127.0.0.1:$PORT" picked png true_label expected code got
  picked=$(pick_image)
  IFS=$'\t' read -r png true_label expected <<<"$picked"
  log "test image ${png#"$ROOT"/}: true '$true_label', bundle says predicted '$expected'"

  code=$(curl -s -o "$STATE/predict.json" -w '%{http_code}' -F "files=@$png;type=image/png" "$url/predict")
  [ "$code" = 200 ] || die "POST /predict -> $code: $(head -c 400 "$STATE/predict.json")"
  got=$(top1_label predict "$STATE/predict.json") || die "unexpected /predict answer"
  log "POST /predict -> 200, top-1 '$got': $(head -c 300 "$STATE/predict.json")"
  [ "$got" = "$expected" ] || die "/predict top-1 '$got' != model.json predicted_label '$expected'"

  code=$(curl -s -o "$STATE/gradcam.json" -w '%{http_code}' -F "files=@$png;type=image/png" "$url/gradcam")
  [ "$code" = 200 ] || die "POST /gradcam -> $code: $(head -c 400 "$STATE/gradcam.json")"
  got=$(top1_label gradcam "$STATE/gradcam.json") || die "unexpected /gradcam answer"
  log "POST /gradcam -> 200 ($(stat -c %s "$STATE/gradcam.json") bytes), label '$got', overlay PNG + heatmap present"
  [ "$got" = "$expected" ] || die "/gradcam label '$got' != model.json predicted_label '$expected'"
}

# /health's runtime and precision: the CPU image answers /predict on OpenVINO at INT8 (the shipped bundle's
# quantized network, chosen by its recorded agreement with fp32: service/inference/choice.py); the CUDA
# image, which carries no OpenVINO, on torch.
check_runtime() {  # check_runtime <cuda|cpu>
  local url="http://127.0.0.1:$PORT" answer
  curl -sf -o "$STATE/health-runtime.json" "$url/health" || die "GET /health failed"
  answer=$(python3 - "$1" "$STATE/health-runtime.json" <<'EOF'
import json, sys
variant, health = sys.argv[1], json.load(open(sys.argv[2]))
runtime, precision = health["runtime"], health["precision"]
if variant == "cpu" and not (runtime.startswith("openvino ") and precision == "int8"):
    sys.exit(f"the CPU image serves {runtime} at {precision}, not openvino at int8: {health['precision_reason']}")
if variant == "cuda" and not runtime.startswith("torch "):
    sys.exit(f"the CUDA image serves {runtime}, not torch")
print(f"{runtime} ({health['runtime_reason']}), precision {precision} ({health['precision_reason']})")
EOF
  ) || die "$answer"
  log "/health: $answer"
}

check_inside() {  # check_inside <cuda|cpu>
  local uid
  if [ "$1" = cpu ]; then
    podman exec "$CONTAINER" python -c 'import sys, torch; sys.exit(f"torch {torch.__version__} has CUDA {torch.version.cuda}" if torch.version.cuda else 0)' \
      || die "the CPU image's torch is a CUDA build"
  fi
  uid=$(podman exec "$CONTAINER" id -u)
  [ "$uid" != 0 ] || die "the service runs as root"
  podman exec "$CONTAINER" python -c 'import importlib.util as u, sys; bad = [m for m in ("lightning", "pytorch_lightning", "torchvision", "nncf") if u.find_spec(m)]; sys.exit(f"training packages present: {bad}" if bad else 0)' \
    || die "training-only packages in the image"
  log "inside: uid $uid, PID 1 '$(podman exec "$CONTAINER" cat /proc/1/comm)', python $(podman exec "$CONTAINER" python -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'), no Lightning/torchvision/NNCF"
}

stop_and_check() {
  local started=$SECONDS code
  log "podman stop -t 30 (SIGTERM)"
  quiet_systemd podman stop -t 30 "$CONTAINER" >/dev/null
  code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
  log "container exited with code $code after $((SECONDS - started)) s; last log lines:"
  podman logs --tail 6 "$CONTAINER" 2>&1 | sed 's/^/  /'
  [ "$code" = 0 ] || die "exit code $code after SIGTERM (expected 0: graceful shutdown)"
  # into a file first: `podman logs | grep -q` fails under pipefail when grep stops reading early
  podman logs "$CONTAINER" >"$STATE/container.log" 2>&1
  grep -q 'Application shutdown complete' "$STATE/container.log" \
    || die "no 'Application shutdown complete' in the logs: not a graceful shutdown"
}

smoke() {
  local variant bytes sizes=()
  for variant in $VARIANTS; do
    IMAGE=$(image_of "$variant")
    smoke_one "$variant"
    bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
    sizes+=("$IMAGE (torch $variant): $bytes bytes = $(numfmt --to=si --round=nearest --format=%.2f "$bytes")B")
  done
  log "image sizes:"
  printf '  %s\n' "${sizes[@]}"
  log "SMOKE PASSED for: $VARIANTS"
}

smoke_one() {  # smoke_one <cuda|cpu>, the image $IMAGE
  [ -f "$ROOT/$BUNDLE/model.json" ] || die "$BUNDLE/model.json is missing"
  podman image exists "$IMAGE" || die "no image $IMAGE: run the build phase"
  trap on_exit EXIT

  log "=== $IMAGE, run 1: the bundle baked into the image"
  start_and_wait
  check_endpoints
  check_open_inference_protocol
  check_predict_and_gradcam
  check_runtime "$1"
  check_inside "$1"
  stop_and_check
  cleanup_container "$CONTAINER"

  if [ "${CAMSERVE_SMOKE_OVERRIDE:-1}" != 0 ]; then
    log "=== $IMAGE, run 2: the bundle mounted from the host (CAMSERVE_MODEL_DIR=/models/override), locked down as in k8s.yaml"
    # a mounted bundle must be readable by the image's uid 10001 (an export may leave it 0600)
    rm -rf "$STATE/override-bundle"
    cp -r "$ROOT/$BUNDLE" "$STATE/override-bundle"
    chmod -R a+rX "$STATE/override-bundle"
    start_and_wait -v "$STATE/override-bundle:/models/override:ro" -e CAMSERVE_MODEL_DIR=/models/override \
      --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
      --memory 3g --cpus 2 -e CAMSERVE_TORCH_THREADS=2
    check_endpoints
    check_predict_and_gradcam
    check_runtime "$1"
    stop_and_check
    cleanup_container "$CONTAINER"
  fi

  local bytes
  bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  log "image $IMAGE: $bytes bytes = $(numfmt --to=si --round=nearest --format=%.2f "$bytes")B = $(numfmt --to=iec-i --round=nearest --format=%.2f "$bytes")B"
  podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | grep -v '^0 B' | cut -c1-100 | sed 's/^/    layer /' 
  log "$IMAGE passed"
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

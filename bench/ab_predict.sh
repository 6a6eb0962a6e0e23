#!/usr/bin/env bash
# A/B of single-image /predict under hey between two checkouts of camserve (e.g. git worktrees of two
# commits): fresh servers, alternating A B A B ..., bf16, TTA none, each serving its own shipped bundle.
#   C=32 DUR=10 ROUNDS=4 bench/ab_predict.sh /tmp/ab/before /tmp/ab/after
# The work is bench/ab_predict.py's (the kit starts, loads and stops the servers); this keeps the command.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$here/../.venv/bin/python}
exec "$PY" "$here/ab_predict.py" --concurrency "${C:-32}" --duration "${DUR:-10}" --rounds "${ROUNDS:-3}" "$@"

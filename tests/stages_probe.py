"""Several ``alignkit train`` runs one after another in one launch, so that tests/test_sharded.py pays
the start of ``accelerate launch`` (DeepSpeed's import and comm setup: ~10 s on 2 cores) once per
backend instead of once per stage. Each run is the CLI's own ``train`` command, as a user launches it.

    python -m tests.stages_probe RUNS.json      # RUNS.json: [[CONFIG.yaml, key=value, ...], ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit.cli import main

if __name__ == "__main__":
    for args in json.loads(Path(sys.argv[1]).read_text()):
        if main(["train", *args]) != 0:
            sys.exit(f"alignkit train {' '.join(args)} failed")

"""Fixed-seed tiny PPO (with a critic) and GRPO runs whose logged metrics and final weights
``tests/test_async_k0.py`` compares with golden values made by the loop before asynchronous RL.

It imports nothing from ``tests`` so that it runs against any alignkit on ``PYTHONPATH``. The
golden file ``tests/data/k0_golden.json`` was made by running it against commit 3366d04 (the loop
before async_level existed), on the tiny model and SFT adapter that today's fixtures build:

    git worktree add /tmp/old 3366d04
    PYTHONPATH=$PWD .venv/bin/python tests/k0_runs.py fixtures /tmp/k0      # today's tiny model + SFT
    PYTHONPATH=/tmp/old .venv/bin/python tests/k0_runs.py runs /tmp/k0 tests/data/k0_golden.json
    git worktree remove /tmp/old
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Short runs: two steps each, few tokens, two PPO epochs so the second epoch's ratio is not 1.
RUNS = {
    "ppo": ("ppo_tiny.yaml", ["max_steps=2", "max_new_tokens=8", "ppo_epochs=2", "ppo_buffer_size=2", "seed=3"]),
    "grpo": ("grpo_tiny.yaml", ["max_steps=2", "max_new_tokens=8", "ppo_epochs=2", "ppo_buffer_size=2",
                                "seed=3"]),
}
# Wall-clock figures (and each row's "time" stamp) differ run to run; everything else a run logs is
# a function of the seed.
TIMED = ("time/", "perf/", "reward/latency", "async/learner_wait_s", "async/producer_wait_s")


def weights_digest(out: Path) -> str:
    """sha256 over every saved tensor of a run's output dir (adapter, value head; checkpoints
    excluded): names, dtypes, shapes and bytes, so file metadata cannot change it."""
    h = hashlib.sha256()
    for f in sorted(p for p in out.rglob("*.safetensors") if "checkpoint" not in str(p.relative_to(out))):
        h.update(str(f.relative_to(out)).encode())
        for name, t in sorted(load_file(str(f)).items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fixture_digest(model_dir: Path, adapter: Path) -> str:
    """The inputs' weights: a golden value only holds for the tiny model and SFT adapter it was made on."""
    return weights_digest(model_dir)[:16] + ":" + weights_digest(adapter)[:16]


def run_one(name: str, model_dir: Path, adapter: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """One run of ``RUNS[name]``: its logged rows (wall-clock keys dropped) and its weights' digest."""
    from alignkit.config import load_config
    from alignkit.train import ppo

    yaml, overrides = RUNS[name]
    cfg = load_config(EXAMPLES / yaml, [
        f"model_name_or_path={model_dir}", f"adapter_name_or_path={adapter}", f"output_dir={out}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", "overwrite_output_dir=true",
        *overrides, *extra])
    ppo.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k != "time" and not k.startswith(TIMED)} for r in rows]
    return {"rows": rows, "weights": weights_digest(out)}


def build_fixtures(base: Path) -> None:
    """Today's tiny model and SFT adapter (as tests/conftest.py builds them) under ``base``."""
    from alignkit.config import load_config
    from alignkit.models.tiny import build_tiny
    from alignkit.train import sft

    build_tiny(base / "tiny")
    sft.run(load_config(EXAMPLES / "sft_tiny.yaml", [
        f"model_name_or_path={base / 'tiny'}", f"output_dir={base / 'sft'}", f"dataset_dir={EXAMPLES / 'data'}",
        "report_to=none", "plot_loss=false", "eval_strategy=no", "val_size=0"]))


def main() -> None:
    torch.set_num_threads(1)  # as the test session runs (tests/conftest.py)
    cmd, base = sys.argv[1], Path(sys.argv[2])
    if cmd == "fixtures":
        build_fixtures(base)
        return
    model_dir, adapter = base / "tiny", base / "sft"
    golden = {"fixtures": fixture_digest(model_dir, adapter)}
    for name in RUNS:
        golden[name] = run_one(name, model_dir, adapter, base / name)
    Path(sys.argv[3]).write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""``alignkit score``: score a JSONL of (prompt, response) rows with a trained reward model.

A quick check of an RM before spending PPO time on it: do good answers score higher than bad
ones, and is the spread of scores sensible?
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path

DESCRIPTION = """\
Score (prompt, response) rows with a reward model trained by `alignkit train` (stage: rm),
LoRA or full, or any *ForSequenceClassification directory with num_labels=1.

Input: JSONL, one {"prompt": ..., "response": ...} object per line (other keys are kept).
Output: the same rows with a "score" key, plus OUTPUT.summary.json (n, mean, std, min, max);
the summary is also printed.

  alignkit score --reward-model outputs/rm_tiny --input pairs.jsonl --output scored.jsonl
"""


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score prompt/response rows (JSONL) with a trained reward model",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward-model", required=True, help="reward model directory (output_dir of an RM run)")
    p.add_argument("--input", required=True, help='JSONL file of {"prompt", "response"} rows')
    p.add_argument("--output", help="JSONL to write the rows with scores to (default: INPUT stem + .scored.jsonl)")
    p.add_argument("--base-model", help="LoRA RM only: base model directory, if not where training recorded it")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--cutoff-len", type=int, default=None, help="max tokens per sequence (default: as in training)")
    p.set_defaults(func=run)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise ValueError(f'{path} line {i + 1}: expected an object with string "prompt" and "response" keys')
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows to score")
    return rows


def summarize(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def run(args: argparse.Namespace) -> int:
    from alignkit.rewards.model import ModelReward

    src = Path(args.input)
    rows = read_rows(src)
    out = Path(args.output) if args.output else src.with_name(src.stem + ".scored.jsonl")
    reward = ModelReward.from_dir(args.reward_model, base_model=args.base_model, device=args.device,
                                  cutoff_len=args.cutoff_len, batch_size=args.batch_size)
    scores = asyncio.run(reward.score([r["prompt"] for r in rows], [r["response"] for r in rows]))
    failed = [(i, s.reason) for i, s in enumerate(scores) if not s.ok]
    if failed:
        raise ValueError(f"{len(failed)} rows could not be scored; first: row {failed[0][0]}: {failed[0][1]}")
    values = [s.value for s in scores]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({**r, "score": v}, ensure_ascii=False) + "\n" for r, v in zip(rows, values, strict=True)))
    summary = summarize(values)
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"scored {summary['n']} rows -> {out}")
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0

"""What a PPO run shows besides its scalars: rollouts you can read, and a reward probe.

Every ``log_samples_every`` steps (and at the first and last), a few rollouts of the step go to
``samples.jsonl`` and to TensorBoard text: prompt, response, score (or the failure), KL and length.
The report shows them from the start, middle and end of the run with the best and worst scored.
With ``reward_probe``, fixed reference answers are re-scored by the reward every
``reward_probe_every`` steps (``probe/score_mean``): a judge that changes under the run, or a
policy that outscores good reference answers, shows in the report's ``reward_probe`` check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.rewards.base import ScoreMeta
from alignkit.rewards.canaries import Canaries
from alignkit.rewards.drift import RankDrift
from alignkit.rewards.service import RewardService
from alignkit.train.ppo.credit import Shaped
from alignkit.train.ppo.experience import Experience
from alignkit.train.tracking import MetricLogger, truncate_jsonl

SAMPLES_FILE = "samples.jsonl"


def pick_samples(scores: torch.Tensor, valid: torch.Tensor, n: int) -> list[tuple[int, str]]:
    """``n`` rows of a batch as (index, why): the best and worst valid scores, then rows spread
    evenly over the batch (so over different prompts)."""
    ok = valid.bool()
    picks: list[tuple[int, str]] = []
    if ok.any() and n >= 2:
        masked = scores.masked_fill(~ok, float("nan"))
        picks = [(int(torch.nan_to_num(masked, nan=-float("inf")).argmax()), "best"),
                 (int(torch.nan_to_num(masked, nan=float("inf")).argmin()), "worst")]
        picks = picks[:1] if picks[0][0] == picks[1][0] else picks  # all scores tied: one row, not two copies
    taken = {i for i, _ in picks}
    spread = [i for i in torch.linspace(0, len(scores) - 1, max(n, 1)).round().long().tolist() if i not in taken]
    return (picks + [(i, "spread") for i in dict.fromkeys(spread)])[:n]


def sample_rows(step: int, exp: Experience, shaped: Shaped, prompts: list[str], n: int) -> list[dict[str, Any]]:
    """The picked rollouts of one step as JSON-ready rows."""
    lengths, kl = exp.response_mask.sum(1), (exp.kl * exp.response_mask).sum(1)
    rows = []
    for i, why in pick_samples(exp.scores, exp.valid, n):
        ok = bool(exp.valid[i])
        rows.append({
            "step": step, "pick": why, "prompt": prompts[int(exp.group_ids[i])], "response": exp.texts[i],
            "score": float(exp.scores[i]) if ok else None,
            "failure": None if ok else exp.stats.failure_reasons[i],
            "shaped_score": float(shaped.scores[i]) if ok else None, "kl": round(float(kl[i]), 4),
            "length": int(lengths[i]), "no_eos": bool(exp.no_eos[i]),
        } | ({"criteria": details[i]} if (details := exp.stats.score_details) and details[i] else {}))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table (TensorBoard's text tab renders it)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| pick | score | KL | length | prompt | response |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['pick']} | {cell(score_text(r))} | {r['kl']} | {r['length']} "
              f"| {cell(r['prompt'])} | {cell(r['response'])} |" for r in rows]
    return "\n".join(lines)


def score_text(row: dict[str, Any]) -> str:
    """A sample's score as a table shows it: ``failed``, or the score with its criteria's (``7.5 (accuracy 8, ...)``)."""
    if row.get("failure") is not None or row.get("score") is None:
        return "failed"
    criteria = row.get("criteria") or {}
    inner = ", ".join(f"{k} {v:.3g}" for k, v in criteria.items())
    return f"{row['score']:.3g}" + (f" ({inner})" if inner else "")


class RewardProbe:
    """Fixed {prompt, response[, label]} reference answers, re-scored through the run's reward."""

    def __init__(self, path: str | Path, service: RewardService, every: int):
        rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
        bad = [n for n, r in enumerate(rows, 1) if not isinstance(r, dict) or not {"prompt", "response"} <= set(r)]
        if not rows or bad:
            raise ValueError(f"reward_probe {path}: every line needs a JSON object with 'prompt' and 'response' "
                             f"(and optionally 'label'); {'the file is empty' if not rows else f'lines {bad[:5]}'}")
        self.rows, self.service, self.every = rows, service, every
        self.drift = RankDrift()  # rank agreement with the first probe (alignkit/rewards/drift.py)

    def __call__(self, step: int) -> dict[str, float]:
        if step != 1 and step % self.every:
            return {}
        # A side call: its requests and judge tokens stay in the source's counters for the next step's
        # metrics (collect() here would drop them), its failures are probe/failures.
        scores = self.service.score_side([r["prompt"] for r in self.rows], [r["response"] for r in self.rows],
                                         ScoreMeta(labels=[r.get("label") for r in self.rows]))
        values = [s.value for s in scores if s.ok]
        return {"probe/score_mean": sum(values) / len(values) if values else float("nan"),
                "probe/failures": float(sum(not s.ok for s in scores)),
                "probe/spearman_vs_first": self.drift([s.value for s in scores])}


@dataclass
class SampleLogger:
    """Writes the samples of a step on schedule and runs the reward probe; main process only."""

    out: Path
    prompts: list[str]  # dataset row -> the prompt text the reward saw
    n: int
    every: int
    last_step: int
    probe: RewardProbe | None = None
    enabled: bool = True
    canaries: Canaries | None = None  # judge canaries, on the reward_probe_every schedule
    labels: list[str | None] | None = None  # dataset row -> its label (the half-label canary)

    @classmethod
    def for_run(cls, cfg, out: Path, prompts: list[str], service: RewardService, last_step: int,
                enabled: bool, resume_step: int = 0, labels: list[str | None] | None = None) -> SampleLogger:
        """The logger ``cfg`` (a PPOConfig) asks for; a resumed run drops samples after its checkpoint."""
        if enabled:
            truncate_jsonl(out / SAMPLES_FILE, resume_step)
        probe = RewardProbe(cfg.reward_probe, service, cfg.reward_probe_every) if cfg.reward_probe and enabled else None
        extra = cfg.canaries()
        canaries = Canaries(service, cfg.reward_probe_every, extra, out) if extra is not None and enabled else None
        return cls(out, prompts, cfg.log_samples, cfg.log_samples_every, last_step, probe, enabled, canaries, labels)

    def __call__(self, step: int, exp: Experience, shaped: Shaped, tracker: MetricLogger) -> dict[str, float]:
        """Log this step's samples when due; returns the probe's metrics (empty when not due)."""
        if not self.enabled:
            return {}
        if self.n and (step == 1 or step % self.every == 0 or step == self.last_step):
            rows = sample_rows(step, exp, shaped, self.prompts, self.n)
            with (self.out / SAMPLES_FILE).open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            tracker.log_text(step, "samples", markdown_table(rows))
        out = self.probe(step) if self.probe is not None else {}
        if self.canaries is not None:
            rows = exp.group_ids.tolist()
            real = exp.scores[exp.valid.bool()].tolist()
            labels = [self.labels[i] if self.labels else None for i in rows]
            out |= self.canaries(step, [self.prompts[i] for i in rows], labels, real)
        return out

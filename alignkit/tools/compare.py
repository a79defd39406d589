"""``alignkit compare``: two models answer the same prompts; one reward source scores both.

Typical use is before/after: ``model_a`` the SFT run, ``model_b`` the PPO run. Generation is
greedy by default with the same seed for both, so the comparison is reproducible. A failed
score is counted as a failure, never as 0, and a pair with a failure is neither a win, a tie
nor a loss. Writes ``compare.json`` (numbers and every example), ``compare.md`` and
``compare.html`` (a side-by-side table) into ``output_dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from alignkit.data.loader import Example, load_examples
from alignkit.rewards.base import Score, ScoreMeta
from alignkit.rewards.factory import build_reward_source
from alignkit.rewards.spec import RewardContext, RewardSpec
from alignkit.runs import ModelSpec, build_spec
from alignkit.tools.config import CommaList, add_config_command, load_tool_config
from alignkit.tools.generator import GenerationKeys, Generator, generate_all


class ModelSide(BaseModel):
    """One side of the comparison: a model dir with optional adapters, or a run dir."""

    model_config = ConfigDict(extra="forbid")

    model_name_or_path: str = Field(description="Base model directory, or an SFT/PPO run dir.")
    adapter_name_or_path: CommaList | None = Field(None, description="Adapters applied (merged) in order.")
    template: str | None = Field(None, description="This side's chat template (default: its run's, else the shared one).")
    default_system: str | None = Field(None, description="This side's system prompt (default: its run's / shared).")
    name: str | None = Field(None, description="Label in the tables (default: the directory name).")


class CompareConfig(GenerationKeys, RewardSpec):
    """``alignkit compare`` keys; ``template``/``default_system`` fill in where a side says nothing.
    The reward keys are PPO's (``RewardSpec``)."""

    model_a: ModelSide = Field(description="Baseline: a path, or {model_name_or_path, adapter_name_or_path, ...}.")
    model_b: ModelSide = Field(description="Candidate, judged against model_a (win = B scores higher).")
    tie_margin: float = Field(0.0, ge=0.0, description="|reward_b - reward_a| <= tie_margin counts as a tie.")
    max_new_tokens: int = Field(128, ge=1, description="Response length limit in tokens.")
    max_examples_shown: int = Field(20, ge=0, description="Rows in the side-by-side tables (compare.json has all).")
    output_dir: str = Field(description="Where compare.json, compare.md and compare.html are written.")

    @field_validator("model_a", "model_b", mode="before")
    @classmethod
    def _side(cls, v: Any) -> Any:
        return {"model_name_or_path": v} if isinstance(v, str) else v

    def reward_context(self) -> RewardContext:
        """A trained reward model is loaded on its own here (cpu unless reward_model_device says
        otherwise) and reads a prompt plus a whole response."""
        return RewardContext(cutoff_len=self.cutoff_len + self.max_new_tokens, batch_size=self.batch_size, device="cpu")


def side_spec(side: ModelSide, cfg: CompareConfig) -> ModelSpec:
    spec = build_spec(side.model_name_or_path, side.adapter_name_or_path, side.template, side.default_system,
                      cfg.enable_thinking)
    if side.template is None and spec.template == "auto" and cfg.template:
        spec.template = cfg.template
    if spec.default_system is None:
        spec.default_system = cfg.default_system
    return spec


async def score_both(cfg: CompareConfig, prompts: list[str], a: list[str], b: list[str],
                     labels: list[str | None]) -> tuple[list[Score], list[Score]]:
    # A trained RM is loaded on its own (either layout): there is no single policy base here to
    # put a LoRA reward adapter on.
    spec = cfg.model_copy(update={"reward_model_type": "full"}) if cfg.reward_model_type == "lora" else cfg
    source = build_reward_source(spec, cfg.reward_context())
    try:
        meta = ScoreMeta(labels=labels)
        return await source.score(prompts, a, meta), await source.score(prompts, b, meta)
    finally:
        await source.aclose()


def _generate(spec: ModelSpec, cfg: CompareConfig, examples: list[Example], tag: str) -> tuple[list, float]:
    gen = Generator(spec, cfg.infer_dtype, cfg.device, cfg.trust_remote_code)
    t0 = time.perf_counter()
    rows = generate_all(gen, cfg, examples, f"compare {tag}")
    return rows, time.perf_counter() - t0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Generate with A then B (one model in memory at a time), score both, write the reports;
    returns what ``compare.json`` holds."""
    # Both sides' paths, the dataset and the output dir are checked before either model loads.
    spec_a, spec_b = side_spec(cfg.model_a, cfg), side_spec(cfg.model_b, cfg)
    examples = load_examples(cfg.dataset, cfg.dataset_dir, "prompt", cfg.max_samples)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    rows_a, secs_a = _generate(spec_a, cfg, examples, "A")
    rows_b, secs_b = _generate(spec_b, cfg, examples, "B")
    # The reward sees the latest user turn, as in PPO.
    prompts = [ex.last_user_text() for ex in examples]
    labels = [ex.label for ex in examples]
    scores_a, scores_b = asyncio.run(
        score_both(cfg, prompts, [r["response"] for r in rows_a], [r["response"] for r in rows_b], labels)
    )
    outcomes = [_outcome(sa, sb, cfg.tie_margin) for sa, sb in zip(scores_a, scores_b, strict=True)]
    scored = sum(o is not None for o in outcomes)
    result: dict[str, Any] = {
        "samples": len(examples),
        "reward": {"type": cfg.reward_model_type, "source": cfg.reward_model or cfg.api_settings().url},
        "generation": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                       "seed": cfg.seed},
        "model_a": _side_summary(cfg.model_a, spec_a, rows_a, scores_a, secs_a),
        "model_b": _side_summary(cfg.model_b, spec_b, rows_b, scores_b, secs_b),
        "pairs_scored": scored,
        "pairs_with_failure": len(outcomes) - scored,
        "b_vs_a": {k: (outcomes.count(k) / scored if scored else None) for k in ("win", "tie", "loss")},
        "b_vs_a_counts": {k: outcomes.count(k) for k in ("win", "tie", "loss")},
        "tie_margin": cfg.tie_margin,
    }
    a_mean, b_mean = result["model_a"]["mean_reward"], result["model_b"]["mean_reward"]
    result["mean_reward_delta"] = b_mean - a_mean if a_mean is not None and b_mean is not None else None
    result["examples"] = [
        {"prompt": p, "label": lab, "response_a": ra["response"], "reward_a": sa.value, "failure_a": sa.reason,
         "response_b": rb["response"], "reward_b": sb.value, "failure_b": sb.reason, "outcome": o}
        for p, lab, ra, rb, sa, sb, o in zip(prompts, labels, rows_a, rows_b, scores_a, scores_b, outcomes, strict=True)
    ]
    write_reports(result, Path(cfg.output_dir), cfg.max_examples_shown)
    return result


def _outcome(a: Score, b: Score, tie_margin: float) -> str | None:
    if not (a.ok and b.ok):
        return None
    diff = b.value - a.value
    return "tie" if abs(diff) <= tie_margin else "win" if diff > 0 else "loss"


def _side_summary(side: ModelSide, spec: ModelSpec, rows: list[dict], scores: list[Score], secs: float) -> dict:
    ok = [s.value for s in scores if s.ok]
    tokens = sum(r["tokens"] for r in rows)
    return {
        "name": side.name or Path(spec.run_dir or (spec.adapters[-1] if spec.adapters else spec.base)).name,
        "base": spec.base, "adapters": spec.adapters, "template": spec.template,
        "mean_reward": _mean(ok), "scored": len(ok), "failures": len(scores) - len(ok),
        "failure_reasons": sorted({s.reason for s in scores if not s.ok and s.reason})[:5],
        "mean_response_tokens": tokens / len(rows) if rows else None,
        "generation_s": round(secs, 3), "tokens_per_s": round(tokens / secs, 2) if secs > 0 else None,
    }


# ---------------------------------------------------------------- reports


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def _summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    a, b = r["model_a"], r["model_b"]
    return [
        ("model", a["name"], b["name"]),
        ("mean reward", _fmt(a["mean_reward"]), _fmt(b["mean_reward"])),
        ("scored / failures", f"{a['scored']} / {a['failures']}", f"{b['scored']} / {b['failures']}"),
        ("mean response tokens", _fmt(a["mean_response_tokens"]), _fmt(b["mean_response_tokens"])),
    ]


def _headline(r: dict[str, Any]) -> str:
    w = r["b_vs_a"]
    return (f"B vs A over {r['pairs_scored']} scored pairs ({r['pairs_with_failure']} with a failed score): "
            f"win {_fmt(w['win'], True)}, tie {_fmt(w['tie'], True)}, loss {_fmt(w['loss'], True)}; "
            f"reward: {r['reward']['type']} {r['reward']['source']}")


def _md_cell(text: Any) -> str:
    return html.escape("" if text is None else str(text)).replace("|", "&#124;").replace("\n", "<br>")


def _reward_cell(ex: dict, side: str) -> str:
    value = ex[f"reward_{side}"]
    return _fmt(value) if value is not None else f"failed: {ex[f'failure_{side}']}"


def write_reports(r: dict[str, Any], out: Path, shown: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n")
    md = ["# alignkit compare", "", _md_cell(_headline(r)), "", "| | A | B |", "|---|---|---|"]
    md += [f"| {k} | {_md_cell(a)} | {_md_cell(b)} |" for k, a, b in _summary_rows(r)]
    md += ["", "## Examples", "", "| # | prompt | A | reward A | B | reward B | B vs A |", "|---|---|---|---|---|---|---|"]
    for i, ex in enumerate(r["examples"][:shown]):
        md.append(f"| {i} | {_md_cell(ex['prompt'])} | {_md_cell(ex['response_a'])} | {_md_cell(_reward_cell(ex, 'a'))} "
                  f"| {_md_cell(ex['response_b'])} | {_md_cell(_reward_cell(ex, 'b'))} | {ex['outcome'] or 'n/a'} |")
    (out / "compare.md").write_text("\n".join(md) + "\n")

    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(a)}</td><td>{e(b)}</td></tr>" for k, a, b in _summary_rows(r))
    examples = "".join(
        f"<tr><td>{i}</td><td>{e(ex['prompt'])}</td><td>{e(ex['response_a'])}</td><td>{e(_reward_cell(ex, 'a'))}</td>"
        f"<td>{e(ex['response_b'])}</td><td>{e(_reward_cell(ex, 'b'))}</td><td>{e(ex['outcome'] or 'n/a')}</td></tr>"
        for i, ex in enumerate(r["examples"][:shown])
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>alignkit compare</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;white-space:pre-wrap}</style></head><body>"
        f"<h1>alignkit compare</h1><p>{e(_headline(r))}</p><table><tr><th></th><th>A</th><th>B</th></tr>{rows}</table>"
        "<h2>Examples</h2><table><tr><th>#</th><th>prompt</th><th>A</th><th>reward A</th><th>B</th><th>reward B</th>"
        f"<th>B vs A</th></tr>{examples}</table></body></html>\n"
    )
    (out / "compare.html").write_text(page)


def cmd_compare(args: argparse.Namespace) -> int:
    cfg = load_tool_config(CompareConfig, args.config, args.overrides)
    r = run_compare(cfg)
    a, b = r["model_a"], r["model_b"]
    print(f"A {a['name']}: mean reward {_fmt(a['mean_reward'])} ({a['failures']} failures); "
          f"B {b['name']}: mean reward {_fmt(b['mean_reward'])} ({b['failures']} failures)")
    print(_headline(r))
    print(f"reports: {Path(cfg.output_dir) / 'compare.md'}, compare.html, compare.json")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_config_command(subparsers, "compare", "generate with two models on the same prompts and score both",
                       CompareConfig, cmd_compare)

"""The demos' closing summary: the PPO run's report and figures, and the before/after table printed."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean


def summarise(ppo_dir: Path, export_report: dict, cmp: dict, outputs: dict[str, str]) -> dict:
    """The PPO run's report (written here) and the figures the demo prints."""
    from alignkit.algos.shaping import ngram_repeat_share
    from alignkit.report import write_report
    from alignkit.train.tracking import read_metrics

    outputs = {**outputs, "report": str(write_report(ppo_dir))}
    health = json.loads((ppo_dir / "report" / "health.json").read_text())
    rows = read_metrics(ppo_dir)
    rewards = [r["env/reward_mean"] for r in rows]
    k = min(10, len(rewards) // 2) or 1
    return {
        "steps_averaged": k,
        "judge_reward_first_steps": sum(rewards[:k]) / k,
        "judge_reward_last_steps": sum(rewards[-k:]) / k,
        "kl_last": rows[-1]["objective/kl"],
        "export_verified": export_report.get("passed"),
        "health": {c["name"]: c["verdict"] for c in health["checks"] if c["verdict"] in ("warn", "fail")},
        "compare": {"mean_reward_sft": cmp["model_a"]["mean_reward"], "mean_reward_ppo": cmp["model_b"]["mean_reward"],
                    "ppo_vs_sft": cmp["b_vs_a"], "failures": cmp["pairs_with_failure"]},
        # Repeated word 3-grams of the answers to the compare prompts: PPO must not buy reward with repetition.
        "repeat_share": {side: fmean(ngram_repeat_share(ex[f"response_{k}"].split()) for ex in cmp["examples"])
                         for side, k in (("sft", "a"), ("ppo", "b"))},
        "examples": [{"prompt": ex["prompt"], "sft": ex["response_a"], "sft_score": ex["reward_a"],
                      "ppo": ex["response_b"], "ppo_score": ex["reward_b"]} for ex in changed_first(cmp["examples"])[:3]],
        "outputs": outputs,
    }


def changed_first(examples: list[dict]) -> list[dict]:
    """The compare examples in order, those where PPO answers differently from SFT first: the
    before/after a reader needs (the win/tie/loss shares say how often that happens)."""
    return sorted(examples, key=lambda ex: ex["response_a"] == ex["response_b"])


def print_summary(s: dict, before: str = "SFT") -> None:
    print()
    print(f"judge reward (mean of the first / last {s['steps_averaged']} PPO steps): {s['judge_reward_first_steps']:.2f} -> "
          f"{s['judge_reward_last_steps']:.2f}; final KL {s['kl_last']:.2f} nats")
    if "success_rate" in s:
        rate = s["success_rate"]
        print(f"success rate of the greedy answers (the task's own check): {before} {rate['base']:.0%} -> "
              f"PPO {rate['PPO']:.0%}")
    print(f"export verified: {s['export_verified']}; compare (PPO vs {before}): {s['compare']}")
    if "vllm" in s:
        print(f"vLLM check: {s['vllm'].get('status')}, first-token log-prob max |diff| "
              f"{s['vllm'].get('first_token_logprob_max_abs_diff', 'n/a')}")
    print(f"repeated 3-gram share of the answers: {before} {s['repeat_share']['sft']:.1%}, "
          f"PPO {s['repeat_share']['ppo']:.1%}")
    print("report health checks needing attention: "
          f"{s['health'] or 'none'} (details and samples in the report)")
    print(f"\nbefore ({before}) / after (PPO) on the first compare prompts where they differ, judge score in brackets:")
    for ex in s["examples"]:
        print(f"  {ex['prompt']}\n    {before} [{ex['sft_score']}] {ex['sft']}\n    PPO [{ex['ppo_score']}] {ex['ppo']}")
    for name, path in s["outputs"].items():
        print(f"  {name:15s} {path}")
    print(f"done in {s['seconds']} s")

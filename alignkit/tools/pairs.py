"""``alignkit pairs``: judge-labelled preference data (RLAIF) from a model and any reward source.

For each prompt: sample ``num_generations`` responses with the rollout engine PPO uses, score them
with the configured reward (the HTTP judge with its concurrency, cache and failure policy; a rule;
a trained reward model) and keep the best as chosen and the worst as rejected when their scores
differ by at least ``min_score_gap``. Failed scores and empty responses never enter a pair; ties
and prompts left with fewer than two scored responses are skipped; all are counted. A chunk is
scored in the background while the next one samples.

Writes into ``output_dir``: ``pairs.jsonl`` (the prompt's messages, chosen and rejected as
assistant messages, both scores), a ``dataset_info.json`` registering it as ``pairs`` (so
``dataset: pairs`` with ``dataset_dir: <output_dir>`` works for ``stage: dpo``, ``kto`` and ``rm``),
``pairs_summary.json`` and ``pairs_state.json``, from which a re-run continues where it stopped
(with ``reward_cache`` set, the chunk in flight is not paid for twice).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from alignkit.config import ConfigError
from alignkit.data.collators import pad_left
from alignkit.data.loader import Example, load_examples
from alignkit.generation import decode_responses
from alignkit.generation.engine import HFEngine, SamplingParams
from alignkit.rewards.base import ScoreMeta
from alignkit.rewards.service import RewardService, build_reward_service
from alignkit.rewards.spec import RewardContext, RewardSpec
from alignkit.runs import build_spec
from alignkit.tools.config import CommaList, add_config_command, load_tool_config
from alignkit.tools.generator import GenerationKeys, Generator

logger = logging.getLogger(__name__)
PAIRS_FILE, SUMMARY_FILE, STATE_FILE = "pairs.jsonl", "pairs_summary.json", "pairs_state.json"
# What a resumed run must share with the one it continues: everything that decides the samples.
SAMPLING_KEYS = ("model_name_or_path", "adapter_name_or_path", "template", "default_system", "enable_thinking",
                 "dataset", "dataset_dir", "max_samples", "cutoff_len", "num_generations", "max_new_tokens",
                 "temperature", "top_p", "top_k", "batch_size", "seed")
DATASET_INFO = {"pairs": {
    "file_name": PAIRS_FILE, "formatting": "sharegpt", "ranking": True,
    "columns": {"messages": "messages", "system": "system", "chosen": "chosen", "rejected": "rejected"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
             "observation_tag": "tool"},
}}


class PairsConfig(GenerationKeys, RewardSpec):
    """``alignkit pairs`` keys: the model and its sampling (predict's names), the reward (PPO's)."""

    model_name_or_path: str = Field(description="Model directory, or an SFT/DPO/PPO run dir, to sample from.")
    adapter_name_or_path: CommaList | None = Field(None, description="Adapters applied (merged) in order.")
    num_generations: int = Field(4, ge=2, description="Responses sampled per prompt (alias n_samples_per_prompt).")
    min_score_gap: float = Field(0.0, ge=0.0, description="Keep a pair only if chosen's score >= rejected's + this "
                                 "(equal scores are always a tie).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (> 0: responses must differ).")
    max_new_tokens: int = Field(128, ge=1, description="Response length limit in tokens.")
    output_dir: str = Field(description="Where pairs.jsonl, dataset_info.json and the summary are written.")
    overwrite_output_dir: bool = Field(False, description="Start afresh instead of continuing the pairs in output_dir.")

    def reward_context(self) -> RewardContext:
        """A trained reward model is loaded on its own and reads a prompt plus a whole response."""
        return RewardContext(template=self.template or "auto", cutoff_len=self.cutoff_len + self.max_new_tokens,
                             batch_size=self.batch_size, device="cpu")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([getattr(self, k) for k in SAMPLING_KEYS], default=str).encode()).hexdigest()


@dataclass
class Counts:
    """What happened to the prompts and responses so far (``pairs_summary.json``)."""

    prompts: int = 0
    pairs: int = 0
    failed_scores: int = 0  # responses whose score failed (they never enter a pair)
    empty_responses: int = 0
    skipped_ties: int = 0  # prompts whose best and worst scores were closer than min_score_gap (or equal)
    skipped_too_few_scored: int = 0  # prompts with fewer than two usable responses
    rows_written: int = 0


def best_vs_worst(responses: list[str], values: list[float], usable: list[bool], min_gap: float
                  ) -> tuple[int, int] | str:
    """Indices of (chosen, rejected) among the usable responses, or why there is no pair:
    ``"too_few_scored"`` or ``"tie"`` (a gap below ``min_gap``, equal scores or equal texts)."""
    ok = [i for i, u in enumerate(usable) if u]
    if len(ok) < 2:
        return "too_few_scored"
    best, worst = max(ok, key=values.__getitem__), min(ok, key=values.__getitem__)
    if values[best] - values[worst] < min_gap or values[best] == values[worst] or responses[best] == responses[worst]:
        return "tie"
    return best, worst


def pair_row(ex: Example, chosen: str, rejected: str, scores: tuple[float, float]) -> dict[str, Any]:
    """One ``pairs.jsonl`` row, in the sharegpt/openai shape the loader reads (``DATASET_INFO``)."""
    row = {"messages": ex.messages, "chosen": {"role": "assistant", "content": chosen},
           "rejected": {"role": "assistant", "content": rejected}, "chosen_score": scores[0], "rejected_score": scores[1],
           "source": ex.source}
    return {"system": ex.system, **row} if ex.system else row


@dataclass
class Chunk:
    """One chunk of prompts, its sampled responses (``num_generations`` per prompt, contiguous) and their scores."""

    examples: list[Example]
    responses: list[str]
    scores: Any  # concurrent.futures.Future[list[Score]]


def sample_chunk(gen: Generator, engine: HFEngine, cfg: PairsConfig, examples: list[Example], seed: int) -> list[str]:
    """``num_generations`` responses per prompt, seeded per chunk so a resumed run samples the same."""
    k = cfg.num_generations
    ids, mask = pad_left([gen.prompt_ids(ex, cfg.cutoff_len) for ex in examples for _ in range(k)],
                         gen.tokenizer.pad_token_id)  # (B*k, Q)
    sampling = SamplingParams(cfg.max_new_tokens, tuple(gen.eos_ids), cfg.temperature, cfg.top_k, cfg.top_p)
    torch.manual_seed(seed)
    with torch.no_grad():
        rollout = engine.generate(ids.to(gen.device), mask.to(gen.device), sampling)
    texts = decode_responses(gen.tokenizer, rollout, skip_special_tokens=not cfg.include_special_tokens)
    return [t.strip() for t in texts]


def finish_chunk(chunk: Chunk, service: RewardService, cfg: PairsConfig, counts: Counts) -> list[dict]:
    """Wait for a chunk's scores (the failure policy applies) and pick its pairs."""
    scored = service.collect([chunk.scores])
    k, rows = cfg.num_generations, []
    counts.failed_scores += scored.n_failed
    for p, ex in enumerate(chunk.examples):
        texts, values = chunk.responses[p * k : (p + 1) * k], scored.values[p * k : (p + 1) * k]
        usable = [ok and bool(t) for ok, t in zip(scored.valid[p * k : (p + 1) * k], texts, strict=True)]
        counts.empty_responses += sum(not t for t in texts)
        picked = best_vs_worst(texts, values, usable, cfg.min_score_gap)
        if picked == "tie":
            counts.skipped_ties += 1
        elif picked == "too_few_scored":
            counts.skipped_too_few_scored += 1
        else:
            best, worst = picked
            rows.append(pair_row(ex, texts[best], texts[worst], (values[best], values[worst])))
    counts.prompts += len(chunk.examples)
    counts.pairs += len(rows)
    return rows


def start_or_resume(cfg: PairsConfig, out: Path) -> Counts:
    """Counts so far: zero for a fresh output_dir; a previous run's (its pairs file cut back to what
    its state recorded: rows of an unfinished chunk are written again) when the sampling keys match."""
    state_path = out / STATE_FILE
    if cfg.overwrite_output_dir or not state_path.is_file():
        if not cfg.overwrite_output_dir and out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"output_dir {out} is not empty and holds no {STATE_FILE} to continue from; "
                              "set overwrite_output_dir=true or choose another output_dir")
        out.mkdir(parents=True, exist_ok=True)
        (out / PAIRS_FILE).write_text("")
        return Counts()
    state = json.loads(state_path.read_text())
    if state["fingerprint"] != cfg.fingerprint():
        raise ConfigError(f"{state_path}: these pairs were sampled with other settings (one of {', '.join(SAMPLING_KEYS)} "
                          "changed); set overwrite_output_dir=true to start afresh, or choose another output_dir")
    counts = Counts(**state["counts"])
    lines = (out / PAIRS_FILE).read_text().splitlines(keepends=True)[: counts.rows_written]
    (out / PAIRS_FILE).write_text("".join(lines))
    logger.info("continuing %s after %d prompts (%d pairs)", out, counts.prompts, counts.pairs)
    return counts


def save_progress(out: Path, cfg: PairsConfig, rows: list[dict], counts: Counts) -> None:
    """Append a chunk's pairs, then record how far the run got (the state is written last)."""
    with (out / PAIRS_FILE).open("a") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts.rows_written += len(rows)
    state = {"fingerprint": cfg.fingerprint(), "counts": vars(counts)}
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(out / STATE_FILE)


def run_pairs(cfg: PairsConfig) -> dict[str, Any]:
    """Sample, score and pair every prompt of ``dataset``; returns what ``pairs_summary.json`` holds."""
    # 1. Check the model, the prompts and output_dir before anything loads; continue a previous run.
    spec = build_spec(cfg.model_name_or_path, cfg.adapter_name_or_path, cfg.template, cfg.default_system,
                      cfg.enable_thinking)
    examples = load_examples(cfg.dataset, cfg.dataset_dir, "prompt", cfg.max_samples)
    out = Path(cfg.output_dir)
    counts = start_or_resume(cfg, out)
    (out / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2) + "\n")

    # 2. The model on the rollout engine PPO uses; the reward service (a LoRA RM is loaded on its own).
    gen = Generator(spec, cfg.infer_dtype, cfg.device, cfg.trust_remote_code)
    engine = HFEngine(gen.model, gen.tokenizer.pad_token_id)
    reward_spec = cfg.model_copy(update={"reward_model_type": "full"}) if cfg.reward_model_type == "lora" else cfg
    service = build_reward_service(reward_spec, cfg.reward_context())

    # 3. Chunk by chunk: sample, submit for scoring, and pick the previous chunk's pairs meanwhile.
    bar = tqdm(total=len(examples), initial=counts.prompts, desc="pairs", unit="prompt", dynamic_ncols=True)

    def finish(chunk: Chunk) -> None:
        save_progress(out, cfg, finish_chunk(chunk, service, cfg, counts), counts)
        bar.update(len(chunk.examples))
        bar.set_postfix(pairs=counts.pairs, failed=counts.failed_scores, ties=counts.skipped_ties)

    pending: Chunk | None = None
    try:
        service.start()
        for start in range(counts.prompts, len(examples), cfg.batch_size):
            batch = examples[start : start + cfg.batch_size]
            texts = sample_chunk(gen, engine, cfg, batch, cfg.seed + start)
            prompts = [ex.last_user_text() for ex in batch for _ in range(cfg.num_generations)]
            labels = [ex.label for ex in batch for _ in range(cfg.num_generations)]
            chunk = Chunk(batch, texts, service.submit(prompts, texts, ScoreMeta(labels=labels)))
            if pending is not None:
                finish(pending)
            pending = chunk
        if pending is not None:
            finish(pending)
        failures = service.failure_summary()
    finally:
        bar.close()
        service.close()

    # 4. The summary, for people and for scripts.
    summary = {**vars(counts), "num_generations": cfg.num_generations, "min_score_gap": cfg.min_score_gap,
               "pairs_file": str(out / PAIRS_FILE), "failures_by_reason": failures}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cmd_pairs(args: argparse.Namespace) -> int:
    cfg = load_tool_config(PairsConfig, args.config, args.overrides)
    s = run_pairs(cfg)
    print(f"pairs: {s['pairs']} from {s['prompts']} prompts ({s['failed_scores']} failed scores, "
          f"{s['skipped_ties']} ties, {s['skipped_too_few_scored']} with < 2 scored responses) -> {s['pairs_file']}")
    print(f"  next: alignkit train examples/dpo_tiny.yaml dataset=pairs dataset_dir={cfg.output_dir}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_config_command(subparsers, "pairs", "sample k responses per prompt, score them (judge, rule, RM), "
                       "write chosen/rejected pairs for dpo, kto and rm", PairsConfig, cmd_pairs)

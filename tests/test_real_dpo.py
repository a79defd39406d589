"""DPO on judge-labelled pairs moves the real model's preferences: SmolLM2-135M-Instruct.

``alignkit pairs`` samples four answers (T 0.7) to "Describe TOPIC in at most ten words." for 60
topics; a judge server on 127.0.0.1 scores them over HTTP with the brief task's graded rule
(tests/real_task.py: length, topic, form, repetition); best vs worst become the pairs. The topics are
split before training: DPO (LoRA, lr 2e-4, 3 epochs) trains on 40 topics' pairs; 20 topics' pairs
are held out.

Held-out preference accuracy is DPO's own (the paper's and TRL's ``rewards/accuracies``): the share of
held-out pairs whose chosen answer gets the higher implicit reward log pi - log pi_ref. Before
training pi = pi_ref, every margin is 0: no preference, chance (0.5). The test asserts at least 0.7
after (14 of 20 unseen topics), and that DPO's training accuracy ends above a half. It also prints
the model's own preference without the reference (mean per-token log-prob, chosen vs rejected): that
one measures taste, not what DPO optimises, and it barely moves.

Measured (seed 0, 1 thread): 60 pairs from 60 prompts, 241 judge requests over HTTP, 0 failures; 40
train, 20 held out. Held-out implicit-reward accuracy 0.50 -> 0.80; per-token preference 0.50 -> 0.55;
training accuracy 0 -> 0.88, loss 0.693 -> 0.365. 7 min wall on 2 cores shared with 3 other runs.
The sampled pairs are not bit-identical run to run (another run: 58 pairs, 2 ties; held-out accuracy
0.80 as well). Tried first: T 1.0 sampling (SmolLM2 then writes nonsense in a third of its answers,
and the pairs teach noise): 0.60; T 0.7 with lr 5e-4: 0.70 (training loss 0.05: it memorises); lr 5e-4,
1 epoch: 0.75.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import torch
import yaml

from alignkit.algos import logprobs_from_logits
from alignkit.cli import main as cli_main
from alignkit.config import load_config
from alignkit.judge.process import JudgeProcess
from alignkit.models.gguf import convert_gguf
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.train import dpo
from alignkit.train.tracking import read_metrics
from tests import real_task

GGUF, pytestmark = real_task.smollm2_and_marks()

MORE_TOPICS = ["a bird", "the forest", "a lamp", "tea", "a mountain", "the wind", "a bridge", "cheese",
               "a clock", "the ocean", "a horse", "a candle", "the desert", "a painting", "spring", "a market",
               "a boat", "honey", "a storm", "the stars", "a school", "a tree", "a lemon", "the beach",
               "a piano", "a kite", "the harbor", "a castle", "a lighthouse", "the library", "a bicycle",
               "a volcano", "a butterfly", "the island", "a pumpkin", "the valley", "a jacket", "a festival",
               "the autumn", "a waterfall", "a rainbow", "the village", "a sandwich", "a telescope"]
TOPICS = real_task.TOPICS + MORE_TOPICS  # 60, one word each after "a"/"the" (real_task.topic_of)
HELD_OUT = {real_task.topic_of(real_task.PROMPT.format(t)) for t in TOPICS[::3]}  # 20 topics
CHANCE, MIN_RISE = 0.5, 0.2  # held-out implicit-reward accuracy after >= chance + 0.2


def split_pairs(pairs_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of pairs.jsonl, by topic; the train rows rewritten as pairs.jsonl."""
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    held = [r for r in rows if real_task.topic_of(r["messages"][-1]["content"]) in HELD_OUT]
    train = [r for r in rows if r not in held]
    (pairs_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (pairs_dir / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))  # kept to inspect
    return train, held


@torch.no_grad()
def response_logprobs(model, tokenizer, messages: list[dict], response: str) -> torch.Tensor:
    """(R,) log-probs of the tokens of ``response`` after the chat-templated ``messages``."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    q = tokenizer.encode(prompt, add_special_tokens=False)
    r = tokenizer.encode(response, add_special_tokens=False)
    ids = torch.tensor([q + r])  # (1, Q+R)
    logits = model(input_ids=ids).logits[:, len(q) - 1 : -1]  # (1, R, V): position t predicts token t+1
    return logprobs_from_logits(logits, ids[:, len(q):])[0]


def implicit_reward_accuracy(tuned, tokenizer, rows: list[dict]) -> float:
    """DPO's preference accuracy (the implicit reward of Rafailov et al. 2023; TRL's ``rewards/accuracies``): the share
    of pairs whose chosen answer gets the higher implicit reward log pi(y|x) - log pi_ref(y|x) (summed
    log-probs; the reference is the base, the adapter off). A tie, as at the start where pi = pi_ref,
    counts half: no preference is chance."""
    def reward(r: dict, key: str) -> float:
        policy = float(response_logprobs(tuned, tokenizer, r["messages"], r[key]["content"]).sum())
        with tuned.disable_adapter():
            ref = float(response_logprobs(tuned, tokenizer, r["messages"], r[key]["content"]).sum())
        return policy - ref

    margins = [reward(r, "chosen") - reward(r, "rejected") for r in rows]
    return mean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)


def per_token_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """The model's own preference, without a reference: the share of pairs whose chosen answer has the
    higher mean per-token log-prob (a sum would favour the shorter answer whatever the model prefers)."""
    return mean(float(response_logprobs(model, tokenizer, r["messages"], r["chosen"]["content"]).mean())
                > float(response_logprobs(model, tokenizer, r["messages"], r["rejected"]["content"]).mean())
                for r in rows)


def test_dpo_on_judge_labelled_pairs_raises_held_out_preference_accuracy(tmp_path):
    model_dir = convert_gguf(GGUF)
    pairs_dir = tmp_path / "pairs"
    rule = "alignkit.rewards.brief:brief_answer"
    with JudgeProcess(rule=rule, log=tmp_path / "judge.log") as judge:
        config = tmp_path / "pairs.yaml"
        config.write_text(yaml.safe_dump({
            "model_name_or_path": str(model_dir), "template": "auto", "dataset": "brief",
            "dataset_dir": str(real_task.write_dataset(tmp_path / "data", TOPICS)), "num_generations": 4,
            "max_new_tokens": 24, "temperature": 0.7, "batch_size": 10, "min_score_gap": 0.2, "seed": 0,
            "reward_model_type": "api", "reward_model": f"{judge.url}/score",
            "reward_api": {"preset": "alignkit", "url": f"{judge.url}/score"}, "output_dir": str(pairs_dir)}))
        assert cli_main(["pairs", str(config)]) == 0
        judged = judge.stats()
    summary = json.loads((pairs_dir / "pairs_summary.json").read_text())
    assert summary["failed_scores"] == 0 and summary["prompts"] == len(TOPICS), summary
    train, held = split_pairs(pairs_dir)
    print(f"pairs: {len(train)} train, {len(held)} held out; judge stats {judged}")
    assert len(train) >= 20 and len(held) >= 7, summary
    assert all(r["chosen_score"] >= r["rejected_score"] + 0.2 for r in train + held)

    tokenizer = load_tokenizer(str(model_dir))
    base = load_causal_lm(str(model_dir)).eval()
    own_before = per_token_accuracy(base, tokenizer, held)
    del base

    run = dpo.run(load_config(None, [
        "stage=dpo", f"model_name_or_path={model_dir}", "template=auto", "dataset=pairs", f"dataset_dir={pairs_dir}",
        "finetuning_type=lora", "lora_rank=16", "lora_alpha=32", "lora_target=q_proj,k_proj,v_proj,o_proj",
        "pref_beta=0.1", "learning_rate=2e-4", "lr_scheduler_type=constant", "per_device_train_batch_size=8",
        "num_train_epochs=3", "cutoff_len=96", "logging_steps=1", "save_steps=1000", "report_to=none",
        "plot_loss=false", f"output_dir={tmp_path / 'dpo'}", "seed=0"]))
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(load_causal_lm(str(model_dir)), str(run)).eval()
    after = implicit_reward_accuracy(tuned, tokenizer, held)
    own_after = per_token_accuracy(tuned, tokenizer, held)
    rows = [m for m in read_metrics(run) if "train/rewards/accuracies" in m]
    print(f"held-out implicit-reward accuracy ({len(held)} pairs): {CHANCE:.2f} (pi = pi_ref) -> {after:.3f}; "
          f"held-out mean per-token log-prob preference {own_before:.3f} -> {own_after:.3f}; DPO train accuracy "
          f"{rows[0]['train/rewards/accuracies']:.2f} -> {rows[-1]['train/rewards/accuracies']:.2f}, "
          f"loss {rows[0]['train/loss']:.3f} -> {rows[-1]['train/loss']:.3f}")
    assert after >= CHANCE + MIN_RISE, after
    assert rows[-1]["train/rewards/accuracies"] > 0.5

"""Reward models on the tiny real model: training, save/reload, scoring through PPO's reward
source (own tokenizer, or an adapter on the policy's base), missing heads, `alignkit score`."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.data.chat_format import ChatFormat
from alignkit.data.collators import PairCollator
from alignkit.data.loader import load_examples, split_train_val
from alignkit.data.templates import get_template
from alignkit.models.actor_critic import build_actor_critic
from alignkit.models.loading import build_policy_model, load_causal_lm, load_tokenizer
from alignkit.models.reward_model import (
    SCORE_HEAD_FILE,
    RewardModel,
    RewardModelError,
    last_token_index,
    load_reward_model,
    pairwise_loss,
    save_reward_model,
    score_sequences,
)
from alignkit.models.tiny import build_tiny
from alignkit.rewards.model import ModelReward, build_model_reward, encode_for_scoring
from alignkit.train import rm as rm_stage
from alignkit.train.checkpoint import list_checkpoints
from alignkit.train.tracking import read_metrics
from tests.conftest import crash_after_first_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

PROMPTS = ["What does the cat do?", "What does the robot do?", "What does my friend do?"]
GOOD = ["A good reply answers the question.", "The robot learns the data in good time.", "A good plan, always."]
PLAIN = ["The cat reads the math problem.", "The robot improves a clear plan.", "My friend learns a short story."]


def rm_config(model_dir, out, **kw):
    args = dict(stage="rm", model_name_or_path=str(model_dir), dataset="prefs_demo", dataset_dir=str(EXAMPLES / "data"),
                template="chatml", output_dir=str(out), cutoff_len=64, per_device_train_batch_size=16,
                learning_rate=3e-3, lr_scheduler_type="constant", max_steps=10, logging_steps=1, save_steps=100,
                lora_rank=8, report_to="none", seed=1)
    args.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in args.items()])


def ppo_config(model_dir, reward_model, kind, **kw):
    args = dict(stage="ppo", model_name_or_path=str(model_dir), dataset="prompts_demo", dataset_dir=str(EXAMPLES / "data"),
                template="chatml", output_dir="unused", reward_model=str(reward_model), reward_model_type=kind,
                cutoff_len=64, per_device_eval_batch_size=2)
    args.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in args.items()])


def score(source, prompts, responses) -> list[float]:
    return [s.value for s in asyncio.run(source.score(prompts, responses))]


def val_rows(n: int | None = None) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of the pairs the fixture's RM run held out (same split and seed)."""
    examples = load_examples("prefs_demo", str(EXAMPLES / "data"), "pairwise")
    _, val = split_train_val(examples, 0.1, 1)
    return [(ex.messages[-1]["content"], ex.chosen, ex.rejected) for ex in val][:n]


def val_pairs(source, n: int | None = None) -> tuple[list[float], list[float]]:
    rows = val_rows(n)
    prompts = [p for p, _, _ in rows]
    return score(source, prompts, [c for _, c, _ in rows]), score(source, prompts, [r for _, _, r in rows])


@pytest.fixture(scope="module")
def lora_rm(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "lora"
    return rm_stage.run(rm_config(tiny_model_dir, out, val_size=0.1, eval_strategy="steps", eval_steps=5,
                                  plot_loss="true"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A second architecture with a different tokenizer (vocabulary 384 instead of 512)."""
    return build_tiny(tmp_path_factory.mktemp("llama") / "model", arch="llama", vocab_size=384, hidden_size=64,
                      intermediate_size=128, num_layers=2, tie_word_embeddings=False)


def test_last_token_and_loss_math():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 1]
    assert last_token_index(left).tolist() == [3, 3]
    loss = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([0.6931, 0.6931]), atol=1e-4, rtol=0)


def test_rm_learns_the_marker_word(lora_rm):
    results = json.loads((lora_rm / "eval_results.json").read_text())
    assert results["eval/accuracy"] >= 0.9, results
    assert results["eval/chosen"] > results["eval/rejected"] and results["eval/margin"] > 0
    logged = read_metrics(lora_rm)
    assert any("eval/accuracy" in r for r in logged) and any("train/accuracy" in r for r in logged)
    for name in ("adapter_model.safetensors", SCORE_HEAD_FILE, "reward_model.json", "tokenizer_config.json",
                 "training_train_loss.png"):
        assert (lora_rm / name).is_file(), name
    meta = json.loads((lora_rm / "reward_model.json").read_text())
    assert meta["format"] == "lora" and meta["template"] == "chatml"
    # The reward source scores the held-out pairs as training's evaluation did (same encoding).
    chosen, rejected = val_pairs(ModelReward.from_dir(lora_rm))
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 0.9 * len(chosen)


def test_pairs_in_both_shapes_with_margins(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = rm_config(tiny_model_dir, tmp_path, dataset="prefs_sharegpt")
    sharegpt = rm_stage.tokenize(cfg, ChatFormat.of(cfg, tokenizer),
                                 load_examples("prefs_sharegpt", str(EXAMPLES / "data"), "pairwise", 8))
    assert len(sharegpt) == 8 and all(f["chosen_ids"][-1] == eot == f["rejected_ids"][-1] for f in sharegpt)
    rows = [{"instruction": "Hi?", "chosen": "A good day.", "rejected": "No.", "margin": 2.0},
            {"instruction": "Yo?", "chosen": "Good.", "rejected": "Bad."}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    cfg = rm_config(tiny_model_dir, tmp_path, dataset=str(tmp_path / "m.json"))
    feats = rm_stage.tokenize(cfg, ChatFormat.of(cfg, tokenizer), load_examples(cfg.dataset, None, "pairwise"))
    batch = PairCollator(tokenizer.pad_token_id)(feats)
    assert batch["margin"].tolist() == [2.0, 0.0]


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_saved_rm_reloads_with_identical_scores(tiny_model_dir, tmp_path, finetuning_type):
    cfg = rm_config(tiny_model_dir, tmp_path / "unused", finetuning_type=finetuning_type)
    rm = RewardModel.from_causal_lm(build_policy_model(cfg))
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    torch.manual_seed(0)
    with torch.no_grad():  # move every trainable weight (LoRA B starts at 0) so a lost weight shows
        for p in rm.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    rm.eval()
    template = get_template("chatml", tokenizer)
    seqs = [encode_for_scoring(tokenizer, template, p, r, 64) for p, r in zip(PROMPTS * 2, GOOD + PLAIN, strict=True)]
    before = score_sequences(rm, seqs, tokenizer.pad_token_id, batch_size=2)
    # Padding must not change a score: batched equals one at a time.
    torch.testing.assert_close(torch.tensor(before), torch.tensor(score_sequences(rm, seqs, 0, batch_size=1)))

    save_reward_model(rm, tmp_path / "saved", tokenizer, {"base_model": str(tiny_model_dir), "template": "chatml"})
    loaded, tok, meta = load_reward_model(tmp_path / "saved")
    assert meta["format"] == finetuning_type and tok.get_vocab() == tokenizer.get_vocab()
    torch.testing.assert_close(torch.tensor(score_sequences(loaded, seqs, tok.pad_token_id)), torch.tensor(before))
    if finetuning_type == "full":  # the plain HF layout, as other tools load it
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved", num_labels=1).eval()
        with torch.no_grad():
            direct = [hf(torch.tensor([s])).logits.item() for s in seqs]
        torch.testing.assert_close(torch.tensor(direct), torch.tensor(before), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_full_rm_with_its_own_tokenizer(tiny_model_dir, llama_dir, tmp_path):
    out = rm_stage.run(rm_config(llama_dir, tmp_path / "rm", finetuning_type="full", max_steps=2, learning_rate=1e-3))
    policy_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm_tok = AutoTokenizer.from_pretrained(out)
    text = "A good reply answers the question."
    assert policy_tok(text)["input_ids"] != rm_tok(text)["input_ids"], "tokenizers should differ for this test"

    cfg = ppo_config(tiny_model_dir, out, "full")
    source = build_model_reward(cfg, cfg.reward_context(), policy_model=None)
    got = score(source, PROMPTS, GOOD)
    # Direct: HF's own sequence classifier on the RM's own tokenizer and chat template.
    hf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    direct = []
    for p, r in zip(PROMPTS, GOOD, strict=True):
        text = rm_tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                          tokenize=False)
        ids = rm_tok(text.rstrip("\n"), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            direct.append(hf(ids).logits.item())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(direct), atol=1e-5, rtol=1e-5)


def test_lora_rm_on_the_policy_base(tiny_model_dir, lora_rm):
    cfg = ppo_config(tiny_model_dir, lora_rm, "lora")
    ac = build_actor_critic(load_causal_lm(str(tiny_model_dir)), cfg)
    with torch.no_grad():  # a policy adapter that differs from the base
        for n, p in ac.lm.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.05)
    ac.adapter_lock = threading.Lock()
    ac.train()
    ids = torch.tensor([[5, 40, 41, 42, 2]])
    mask = torch.ones_like(ids)
    logits_before = ac.lm(input_ids=ids, attention_mask=mask).logits.detach()

    policy_modules = list(ac.modules())
    source = build_model_reward(cfg, cfg.reward_context(), ac)
    # Scoring waits for the adapter lock the trainer holds around policy forward passes.
    result = {}
    with ac.adapter_lock:
        worker = threading.Thread(target=lambda: result.update(v=score(source, PROMPTS * 2, GOOD + PLAIN)))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive(), "scoring ran while the policy held the adapter lock"
    worker.join()
    alone = score(ModelReward.from_dir(lora_rm), PROMPTS * 2, GOOD + PLAIN)
    torch.testing.assert_close(torch.tensor(result["v"]), torch.tensor(alone), atol=1e-5, rtol=1e-5)

    # The policy adapter is active and trainable again; the reward adapter is frozen; modes restored.
    assert ac.lm.active_adapter == "default"
    lora = {n: p.requires_grad for n, p in ac.lm.named_parameters() if "lora_" in n}
    assert all(v for n, v in lora.items() if ".default." in n)
    assert not any(v for n, v in lora.items() if ".reward." in n) and any(".reward." in n for n in lora)
    assert all(m.training for m in policy_modules)
    ac.eval()
    torch.testing.assert_close(ac.lm(input_ids=ids, attention_mask=mask).logits.detach(), logits_before)


def test_missing_score_head_is_an_error(tiny_model_dir, lora_rm, tmp_path):
    broken = tmp_path / "no_head"
    shutil.copytree(lora_rm, broken, ignore=shutil.ignore_patterns("checkpoint-*", SCORE_HEAD_FILE))
    with pytest.raises(RewardModelError, match=rf"no {SCORE_HEAD_FILE}.*stage: rm"):
        load_reward_model(broken)
    with pytest.raises(RewardModelError, match=SCORE_HEAD_FILE):
        cfg = ppo_config(tiny_model_dir, broken, "lora")
        build_model_reward(cfg, cfg.reward_context(), build_actor_critic(load_causal_lm(str(tiny_model_dir)), cfg))
    # A plain language model (e.g. the SFT output) is not a full reward model either.
    with pytest.raises(RewardModelError, match=r"no score head.*stage: rm"):
        load_reward_model(tiny_model_dir)


def test_score_command(lora_rm, tmp_path, capsys):
    pairs = val_rows(4)
    rows = [{"prompt": p, "response": r, "id": i} for i, (p, r) in
            enumerate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs])]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--reward-model", str(lora_rm), "--input", str(src), "--output", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == list(range(8))
    values = torch.tensor([r["score"] for r in scored])
    assert values[:4].mean() > values[4:].mean(), values
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["n"] == 8 and summary["mean"] == pytest.approx(values.mean().item(), abs=1e-5)
    assert summary["std"] == pytest.approx(values.std(unbiased=False).item(), abs=1e-5)
    assert "mean=" in capsys.readouterr().out

    src.write_text('{"prompt": "hi"}\n')
    assert main(["score", "--reward-model", str(lora_rm), "--input", str(src)]) == 1
    assert "line 1" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(llama_dir, tmp_path, monkeypatch):
    kw = dict(finetuning_type="full", max_steps=4, save_steps=2, learning_rate=1e-3, per_device_train_batch_size=4)
    full = rm_stage.run(rm_config(llama_dir, tmp_path / "full", **kw))

    crash_after_first_checkpoint(lambda: rm_stage.run(rm_config(llama_dir, tmp_path / "cut", **kw)), monkeypatch)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-2"]
    resumed = rm_stage.run(rm_config(llama_dir, tmp_path / "cut", resume_from_checkpoint="true", **kw))

    a, _, _ = load_reward_model(full)
    b, _, _ = load_reward_model(resumed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, msg=name)
    losses = lambda run: [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]  # noqa: E731
    assert losses(full) == pytest.approx(losses(resumed))

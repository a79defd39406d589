"""Data-parallel training: two CPU processes under ``torchrun`` (DDP over gloo), checked against
what a single process does and what the judge server saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import load_config
from alignkit.judge.server import start_judge_server
from alignkit.train import rm, sft
from alignkit.train.common import global_batch_indices
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES
from tests.launch import WORLD, launch

pytestmark = pytest.mark.slow
N_PROMPTS = 16


def sft_overrides(model_dir, out, *extra) -> list[str]:
    return [f"model_name_or_path={model_dir}", f"output_dir={out}", f"dataset_dir={EXAMPLES / 'data'}",
            "report_to=none", "plot_loss=false", "eval_strategy=no", "val_size=0", "seed=3", "max_steps=3",
            "learning_rate=1e-3", "lr_scheduler_type=constant", "warmup_ratio=0", "lora_dropout=0", *extra]


def test_sft_ddp_matches_one_process_and_resumes(tiny_model_dir, tmp_path):
    # One process with batch 4 and two ranks with batch 2 each train on the same global batches.
    single = sft.run(load_config(EXAMPLES / "sft_tiny.yaml", sft_overrides(
        tiny_model_dir, tmp_path / "single", "per_device_train_batch_size=4")))
    ddp = tmp_path / "ddp"
    launch(EXAMPLES / "sft_tiny.yaml", sft_overrides(tiny_model_dir, ddp, "per_device_train_batch_size=2",
                                                     "save_steps=2"))

    a, b = load_file(str(single / "adapter_model.safetensors")), load_file(str(ddp / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    base = load_file(str(ddp / "checkpoint-2" / "adapter_model.safetensors"))
    assert any(not torch.equal(base[k], b[k]) for k in b)  # the last step did change the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    # Only rank 0 logged: one line per step, the global batch's loss, as in the single run.
    rows, ref = read_metrics(ddp), read_metrics(single)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [3]
    assert rows[0]["train/loss"] == pytest.approx(ref[0]["train/loss"], rel=1e-4)

    # Resume the finished run from checkpoint-2 with the same two ranks: step 3 again, same result.
    launch(EXAMPLES / "sft_tiny.yaml", sft_overrides(tiny_model_dir, ddp, "per_device_train_batch_size=2",
                                                     "save_steps=2", "resume_from_checkpoint=true"))
    c = load_file(str(ddp / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(c[k], b[k], atol=1e-6, rtol=1e-5)
    assert [r["step"] for r in read_metrics(ddp)] == [3]


def test_rm_ddp_matches_one_process(tiny_model_dir, tmp_path):
    args = [f"model_name_or_path={tiny_model_dir}", f"dataset_dir={EXAMPLES / 'data'}", "adapter_name_or_path=null",
            "report_to=none", "plot_loss=false", "eval_strategy=no", "val_size=0", "max_steps=2",
            "learning_rate=1e-3", "lora_dropout=0"]
    single = rm.run(load_config(EXAMPLES / "rm_tiny.yaml", [*args, f"output_dir={tmp_path / 'single'}",
                                                            "per_device_train_batch_size=4"]))
    launch(EXAMPLES / "rm_tiny.yaml", [*args, f"output_dir={tmp_path / 'ddp'}", "per_device_train_batch_size=2"])
    for name in ("adapter_model.safetensors", "score_head.safetensors"):
        a, b = load_file(str(single / name)), load_file(str(tmp_path / "ddp" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory) -> Path:
    """Distinct prompt texts, so a (prompt, response) pair names one sample of the run."""
    d = tmp_path_factory.mktemp("prompts")
    topics = ["rain", "tea", "maps", "owls", "jazz", "bread", "snow", "glass", "kites", "moss", "ink", "salt",
              "bees", "clay", "wool", "dunes"]
    rows = [{"prompt": f"Say something good about {t}."} for t in topics[:N_PROMPTS]]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "dataset_info.json").write_text(json.dumps({"p": {"file_name": "prompts.jsonl",
                                                           "columns": {"prompt": "prompt"}}}))
    return d


def ppo_overrides(model_dir, data_dir, out, *extra) -> list[str]:
    # Per rank: rollout batch 2 (per_device 2 x buffer 1); globally 4 prompts a step.
    return [f"model_name_or_path={model_dir}", "adapter_name_or_path=null", f"output_dir={out}",
            f"dataset_dir={data_dir}", "dataset=p", "report_to=none", "plot_loss=false", "seed=5",
            "per_device_train_batch_size=2", "ppo_buffer_size=1", "ppo_epochs=1", "max_new_tokens=8",
            "max_steps=2", "lora_dropout=0", *extra]


# A rule reward that records, per rank, the prompts it scores (in order): what each rank rolled out,
# seen from outside the trainer. Ranks score one rollout batch per step, in step order.
RECORDING_RULE = """import json, os
def score(prompt, response, label):
    with open(os.environ["ROLLOUT_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ["RANK"]), "prompt": prompt}) + "\\n")
    return float(response.count("good"))
"""


def rollout_log(path: Path, prompts_dir: Path, per_step: int) -> dict[int, dict[int, list[int]]]:
    """step -> rank -> prompt indices that rank scored (from the recording rule's log)."""
    index = {json.loads(ln)["prompt"]: i for i, ln in enumerate((prompts_dir / "prompts.jsonl").read_text().splitlines())}
    by_rank: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_rank.setdefault(row["rank"], []).append(index[row["prompt"]])
    log: dict[int, dict[int, list[int]]] = {}
    for rank, seen in by_rank.items():
        for j in range(0, len(seen), per_step):
            log.setdefault(j // per_step, {})[rank] = seen[j : j + per_step]
    return log


def assert_ranks_split_global_batches(log, steps: int, seed: int = 5) -> None:
    assert sorted(log) == list(range(steps))
    for step, by_rank in log.items():
        assert sorted(by_rank) == [0, 1]
        assert not set(by_rank[0]) & set(by_rank[1])  # each rank rolled out its own prompts
        assert sorted(by_rank[0] + by_rank[1]) == sorted(global_batch_indices(N_PROMPTS, step, 2 * WORLD, seed))


def test_ppo_ddp_rule_reward_splits_prompts_and_resumes(tiny_model_dir, prompts_dir, tmp_path):
    out, debug, rule = tmp_path / "ppo", tmp_path / "rollouts.jsonl", tmp_path / "recording_rule.py"
    rule.write_text(RECORDING_RULE)
    launch(EXAMPLES / "ppo_tiny.yaml", ppo_overrides(tiny_model_dir, prompts_dir, out, "save_steps=1",
                                                     f"reward_model={rule}:score"),
           env={"ROLLOUT_LOG": str(debug)})
    assert_ranks_split_global_batches(rollout_log(debug, prompts_dir, per_step=2), steps=2)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # rank 0 alone wrote the log
    assert (out / "checkpoint-1").is_dir() and (out / "value_head.safetensors").is_file()

    # Resume from checkpoint-1 with two ranks: each rank restores its own RNG, so step 2 samples
    # the same responses and the final weights match the uninterrupted run.
    first = load_file(str(out / "value_head.safetensors"))
    first_rows = read_metrics(out)
    launch(EXAMPLES / "ppo_tiny.yaml", ppo_overrides(tiny_model_dir, prompts_dir, out, "save_steps=1",
                                                     f"reward_model={rule}:score", "resume_from_checkpoint=true"),
           env={"ROLLOUT_LOG": str(tmp_path / "resumed.jsonl")})
    again = load_file(str(out / "value_head.safetensors"))
    for k in first:
        torch.testing.assert_close(again[k], first[k], atol=1e-6, rtol=1e-5)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["env/reward_mean"] == pytest.approx(first_rows[1]["env/reward_mean"])
    assert rows[1]["rollout/response_len_mean"] == pytest.approx(first_rows[1]["rollout/response_len_mean"])


def test_grpo_ddp_async_level_one_splits_prompts_and_stays_within_its_staleness(tiny_model_dir, prompts_dir,
                                                                               tmp_path):
    # Two ranks, one step off-policy: each rank pipelines its own share of every global batch
    # (the same prompts as a synchronous run), and every logged step trains on a batch at most
    # one version old, with the correction's ratio near 1.
    out, debug, rule = tmp_path / "grpo", tmp_path / "rollouts.jsonl", tmp_path / "recording_rule.py"
    rule.write_text(RECORDING_RULE)
    launch(EXAMPLES / "grpo_tiny.yaml", ppo_overrides(tiny_model_dir, prompts_dir, out, f"reward_model={rule}:score",
                                                      "num_generations=2", "per_device_train_batch_size=1",
                                                      "ppo_buffer_size=2", "max_steps=3", "async_level=1"),
           env={"ROLLOUT_LOG": str(debug)})
    log = rollout_log(debug, prompts_dir, per_step=2 * 2)  # 2 prompts x 2 responses per rank and step
    groups = {step: {rank: list(dict.fromkeys(seen)) for rank, seen in by_rank.items()} for step, by_rank in log.items()}
    assert_ranks_split_global_batches(groups, steps=3)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r.get("async/staleness_max") for r in rows] == [None, 1.0, 1.0]
    assert all(0.5 < r["is/ratio_mean"] < 2.0 for r in rows[1:])


def test_ppo_ddp_api_reward_scores_each_sample_once(tiny_model_dir, prompts_dir, tmp_path):
    with start_judge_server(rule="count_good") as judge:
        api = ["reward_model_type=api", "reward_model=null", "reward_api.preset=alignkit",
               f"reward_api.url={judge.url_for('alignkit')}", "reward_api.max_retries=0",
               "judge_canaries=false"]  # exact request counts below
        launch(EXAMPLES / "ppo_tiny.yaml", ppo_overrides(tiny_model_dir, prompts_dir, tmp_path / "ppo", *api),
               accelerate="ddp")
        stats = judge.stats.snapshot(pairs=True)
    steps, global_rollout = 2, 2 * WORLD
    prompts = [json.loads(ln)["prompt"] for ln in (prompts_dir / "prompts.jsonl").read_text().splitlines()]
    # The global batches of the run (the rule test shows how ranks split them).
    rolled = sorted(prompts[i] for step in range(steps) for i in global_batch_indices(N_PROMPTS, step, global_rollout, 5))
    samples = [p for p in stats["pairs"] if p["prompt"] in prompts]
    probes = [p for p in stats["pairs"] if p["prompt"] not in prompts]  # each rank's health check
    assert sum(p["count"] for p in probes) == WORLD
    # Every rolled-out sample was scored exactly once.
    assert sorted(p["prompt"] for p in samples) == rolled and len(rolled) == steps * global_rollout
    assert all(p["count"] == 1 for p in samples)
    assert stats["items"] == steps * global_rollout + WORLD

"""Sharded training on two CPU processes (gloo): DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2 through the
shipped accelerate configs, checked against one process. ZeRO needs scripts/setup_deepspeed.sh; FSDP
is alignkit's own fully_shard, the code path GPUs run (accelerate's FSDP plugin stays off)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.train import sft, sharding
from alignkit.train.checkpoint import load_state
from alignkit.train.ppo.loop import build_models
from alignkit.train.sharding import FSDP_ENV
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES
from tests.launch import launch, requires_deepspeed
from tests.test_distributed import ppo_overrides, prompts_dir, sft_overrides  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
ZERO = ["deepspeed_zero2", "deepspeed_zero3"]
BACKENDS = [*(pytest.param(c, marks=requires_deepspeed) for c in ZERO), "fsdp"]
ADAPTER = "adapter_model.safetensors"


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=rtol, msg=k)


@pytest.fixture(scope="module")
def single_sft(tiny_model_dir, tmp_path_factory):
    """One process, micro-batch 4: the global batches the two-rank runs split."""
    out = tmp_path_factory.mktemp("single") / "sft"
    return sft.run(load_config(EXAMPLES / "sft_tiny.yaml", sft_overrides(
        tiny_model_dir, out, "per_device_train_batch_size=4", "save_steps=2")))


@pytest.mark.parametrize("config", BACKENDS)
def test_sft_matches_one_process_and_resumes(config, tiny_model_dir, single_sft, tmp_path):
    # 2 ranks x micro-batch 2 under ZeRO or FSDP = 1 process x 4, to float32 reduction-order noise: ZeRO
    # sums gradients in its own flat buffers and order (FSDP reduce-scatters shards), and Adam's first
    # steps (lr 1e-3, about lr * sign(g)) amplify it on near-zero gradients of the zero-initialised
    # lora_B; measured up to 1.7e-5 (ZeRO), 8.5e-6 (FSDP).
    out = tmp_path / "sft"
    args = sft_overrides(tiny_model_dir, out, "per_device_train_batch_size=2", "save_steps=2")
    launch(EXAMPLES / "sft_tiny.yaml", args, accelerate=config)
    final = load_file(str(out / ADAPTER))
    assert_same(load_file(str(single_sft / ADAPTER)), final, atol=5e-5, rtol=1e-4)
    # The checkpoint's adapter (gathered from the shards by rank 0) is what one process saved at step 2.
    assert_same(load_file(str(single_sft / "checkpoint-2" / ADAPTER)),
                load_file(str(out / "checkpoint-2" / ADAPTER)), atol=5e-5, rtol=1e-4)
    assert (out / "checkpoint-2" / "shards" / "latest").is_file() == (config != "fsdp")
    assert read_metrics(out)[0]["train/loss"] == pytest.approx(read_metrics(single_sft)[0]["train/loss"], rel=1e-4)

    # Resume from checkpoint-2 (ZeRO's shards, or FSDP's whole state): step 3 again gives the same weights.
    launch(EXAMPLES / "sft_tiny.yaml", [*args, "resume_from_checkpoint=true"], accelerate=config)
    assert_same(final, load_file(str(out / ADAPTER)), atol=1e-6, rtol=1e-5)


def consolidated_policy_files(cfg, ckpt, tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    """What one process saves after loading the fp32 weights rebuilt from a ZeRO checkpoint's shards,
    or the whole trainable weights an FSDP checkpoint keeps for resuming."""
    if (ckpt / "shards").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "shards"))  # its "latest" names the tag
    else:
        state = load_state(ckpt)["model"]
    ac = build_models(cfg)
    trainable = {n for n, p in ac.named_parameters() if p.requires_grad}
    missing, _ = ac.load_state_dict({k: v for k, v in state.items() if k in trainable}, strict=False)
    assert trainable.isdisjoint(missing)
    ac.save_policy(tmp_path)
    return {name: load_file(str(tmp_path / name)) for name in (ADAPTER, "value_head.safetensors")}


@pytest.mark.parametrize("config", BACKENDS)
def test_ppo_lora_resumes_exactly(config, tiny_model_dir, prompts_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ppo"
    args = ppo_overrides(tiny_model_dir, prompts_dir, out, "save_steps=1", "reward_model=count_good")
    launch(EXAMPLES / "ppo_tiny.yaml", args, accelerate=config)
    first = {name: load_file(str(out / name)) for name in (ADAPTER, "value_head.safetensors")}
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]

    # The adapter and value head rank 0 saved equal what one process saves from the same weights
    # (rebuilt by DeepSpeed's zero_to_fp32 from every rank's shards, or FSDP's gathered state).
    single = consolidated_policy_files(load_config(EXAMPLES / "ppo_tiny.yaml", args), out / "checkpoint-1",
                                       tmp_path / "single")
    for name, tensors in single.items():
        assert_same(tensors, load_file(str(out / "checkpoint-1" / name)), atol=0, rtol=0)

    # Resume from checkpoint-1: weights, optimizer and scheduler from the shards, KL controller and
    # each rank's RNG from the state file, so step 2 samples and updates exactly as before.
    launch(EXAMPLES / "ppo_tiny.yaml", [*args, "resume_from_checkpoint=true"], accelerate=config)
    for name, tensors in first.items():
        assert_same(tensors, load_file(str(out / name)), atol=1e-6, rtol=1e-5)
    again = read_metrics(out)
    assert [r["step"] for r in again] == [1, 2]
    for key in ("env/reward_mean", "rollout/response_len_mean", "ppo/loss/total"):
        assert again[1][key] == pytest.approx(rows[1][key])

    # The final save is a plain peft directory: export merges it and verifies the merged model.
    assert main(["export", "--from", str(out), "--export_dir", str(tmp_path / "export")]) == 0
    assert "PASSED" in capsys.readouterr().out


def rollout_gathers(config: str, tiny_model_dir, tmp_path) -> tuple[dict, dict, dict]:
    """Launch ``tests/<zero3|fsdp>_rollout_probe.py``: the backend's own all-gather calls, counted
    while sampling 2 and 8 tokens with and without ``rollout_context``."""
    result = tmp_path / "gathers.json"
    probe = "tests.zero3_rollout_probe" if config == "deepspeed_zero3" else "tests.fsdp_rollout_probe"
    launch(EXAMPLES / "ppo_tiny.yaml", [str(result), f"model_name_or_path={tiny_model_dir}", "adapter_name_or_path=null",
                                        f"output_dir={tmp_path / 'out'}", "reward_model=count_good"],
           accelerate=config, module=probe)
    counts = json.loads(result.read_text())
    return counts, counts["gather_once"], counts["per_layer"]


@requires_deepspeed
def test_zero3_rollout_gathers_parameters_once(tiny_model_dir, tmp_path):
    counts, once, per_layer = rollout_gathers("deepspeed_zero3", tiny_model_dir, tmp_path)
    # Inside rollout_context: one GatheredParameters, each parameter all-gathered at most once,
    # whatever the number of tokens.
    assert once["2"] == once["8"]
    assert once["8"]["GatheredParameters"] == 1
    assert 0 < once["8"]["all_gather_into_tensor"] <= counts["n_params"]
    # Without it ZeRO-3 gathers every layer again for every token: the counter sees real gathers.
    assert per_layer["8"]["all_gather_into_tensor"] > 3 * per_layer["2"]["all_gather_into_tensor"]


def test_fsdp_rollout_gathers_parameters_once(tiny_model_dir, tmp_path):
    counts, once, per_layer = rollout_gathers("fsdp", tiny_model_dir, tmp_path)
    # Inside rollout_context: every unit unsharded once (one all-gather each), whatever the number of tokens.
    assert once["2"] == once["8"]
    assert 0 < once["8"]["all_gather"] <= counts["n_units"]
    # Without it FSDP gathers every block again for every token: the counter sees real gathers.
    assert per_layer["8"]["all_gather"] > 3 * per_layer["2"]["all_gather"]


@requires_deepspeed
def test_ppo_accumulation_under_deepspeed_steps_once_per_mini_batch(tiny_model_dir, prompts_dir, tmp_path):  # noqa: F811
    # The same rollout batch of 2 prompts per rank (per_device x accumulation) and one mini-batch: backed
    # up as 2 micro-batches of 1 with one optimizer step at the boundary, or as one micro-batch of 2.
    # Equal up to float noise (each micro-batch trims its own padding, and sums in its own order):
    # measured 2.2e-7 on the adapter; stepping after every backward instead (what DeepSpeed did before it
    # was told the accumulation) would be a second Adam step of about lr = 5e-4 per weight.
    runs = {}
    for name, sizes in {"accum": ("per_device_train_batch_size=1", "gradient_accumulation_steps=2"),
                        "one": ("per_device_train_batch_size=2", "gradient_accumulation_steps=1")}.items():
        runs[name] = tmp_path / name
        launch(EXAMPLES / "ppo_tiny.yaml", ppo_overrides(tiny_model_dir, prompts_dir, runs[name], *sizes,
                                                         "max_steps=1", "reward_model=count_good"),
               accelerate="deepspeed_zero2")
    assert read_metrics(runs["accum"])[0]["env/reward_mean"] == read_metrics(runs["one"])[0]["env/reward_mean"]
    for name in (ADAPTER, "value_head.safetensors"):
        one, accum = load_file(str(runs["one"] / name)), load_file(str(runs["accum"] / name))
        assert_same(one, accum, atol=2e-6, rtol=1e-5)
    assert all(accum[k].abs().max() > 1e-4 for k in accum)  # the step moved the weights (value head)


# Every stage under every sharded backend, one launch per backend running the stages one after another
# (tests/stages_probe.py; 2 ranks, 1-2 steps), against the same runs in one process. Files compared by
# name (checkpoints aside) and tensors by key; values where the math is the same: 2 ranks x micro-batch
# 2 = 1 process x 4 for the fit stages, not for GRPO (each rank samples its own responses).
FIT = ["report_to=none", "plot_loss=false", "eval_strategy=no", "val_size=0", "seed=3", "lora_dropout=0",
       "lr_scheduler_type=constant", "warmup_ratio=0", f"dataset_dir={EXAMPLES / 'data'}", "save_steps=1000"]
STAGES = {
    # stage: (example config, overrides, per-device batch on 2 ranks / on 1, weight files, atol of the values)
    "rm": ("rm_tiny", [*FIT, "max_steps=2", "learning_rate=1e-3"], ("2", "4"),
           (ADAPTER, "score_head.safetensors"), 5e-5),
    "dpo": ("dpo_tiny", [*FIT, "max_steps=2", "learning_rate=1e-3"], ("2", "4"), (ADAPTER,), 5e-5),
    # Full fine-tuning with SGD: each weight moves by lr x its gradient, so reduction-order noise stays
    # at float32 level (Adam's first step, about lr x sign(g), would amplify it on near-zero gradients).
    "sft_full": ("sft_tiny", [*FIT, "max_steps=2", "finetuning_type=full", "optim=sgd", "learning_rate=0.05"],
                 ("2", "4"), ("model.safetensors",), 1e-5),
    "grpo": ("grpo_tiny", ["report_to=none", "plot_loss=false", "seed=3", "lora_dropout=0", "save_steps=1000",
                           f"dataset_dir={EXAMPLES / 'data'}", "adapter_name_or_path=null", "num_generations=2",
                           "ppo_buffer_size=1", "max_new_tokens=8", "max_steps=1"], ("1", "2"), (ADAPTER,), None),
}


def stage_args(stage: str, model_dir, out, batch: str) -> list[str]:
    config, args, *_ = STAGES[stage]
    return [str(EXAMPLES / f"{config}.yaml"), f"model_name_or_path={model_dir}", f"output_dir={out}", *args,
            f"per_device_train_batch_size={batch}"]


@pytest.fixture(scope="module")
def single_stages(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Each stage's run in one process, with the doubled batch."""
    root = tmp_path_factory.mktemp("single")
    for stage, spec in STAGES.items():
        assert main(["train", *stage_args(stage, tiny_model_dir, root / stage, spec[2][1])]) == 0
    return {stage: root / stage for stage in STAGES}


def top_files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("config", BACKENDS)
def test_every_stage_saves_what_one_process_saves(config, tiny_model_dir, single_stages, tmp_path):
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps([stage_args(s, tiny_model_dir, tmp_path / s, spec[2][0]) for s, spec in STAGES.items()]))
    launch(runs, [], accelerate=config, module="tests.stages_probe")
    for stage, (*_, files, atol) in STAGES.items():
        out, single = tmp_path / stage, single_stages[stage]
        assert top_files(out) == top_files(single), stage
        for name in files:
            one, sharded = load_file(str(single / name)), load_file(str(out / name))
            if atol is None:
                assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in sharded.items()}, stage
            else:
                assert_same(one, sharded, atol=atol, rtol=1e-4)


def fake_accelerator(name: str, monkeypatch) -> SimpleNamespace:
    """What ``sharding.backend`` reads of an Accelerator launched with examples/accelerate/{name}.yaml."""
    monkeypatch.setenv(FSDP_ENV, str(name == "fsdp").lower())
    zero = name.startswith("deepspeed_zero")
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED if zero else DistributedType.MULTI_CPU,
                           num_processes=2, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
                               zero_stage=int(name[-1]) if zero else None)))


@pytest.mark.parametrize(("config", "combo", "message"), [
    ("deepspeed_zero3", {"lora_reward": True}, "reward_model_type: lora"),
    ("fsdp", {"lora_reward": True}, "reward_model_type: lora"),
    ("deepspeed_zero3", {"vllm": True}, "rollout_engine: vllm"),
    ("fsdp", {"vllm": True}, "rollout_engine: vllm"),
    ("deepspeed_zero3", {"frozen_reference": True}, "frozen copy"),
])
def test_unsupported_combinations_are_refused(config, combo, message, monkeypatch):
    with pytest.raises(NotImplementedError, match=message):
        sharding.check_supported(fake_accelerator(config, monkeypatch), **combo)


@pytest.mark.parametrize("config", ["ddp", "deepspeed_zero2", "fsdp"])
def test_what_runs_is_not_refused(config, monkeypatch):
    unsharded = config != "fsdp"  # a LoRA reward and vLLM need the policy's weights whole
    sharding.check_supported(fake_accelerator(config, monkeypatch), lora_reward=unsharded, vllm=unsharded,
                             frozen_reference=True)


@pytest.mark.parametrize(("key", "value"), [("VERSION", "1"), ("OFFLOAD_PARAMS", "true"),
                                            ("ACTIVATION_CHECKPOINTING", "true")])
def test_fsdp_keys_alignkit_does_not_honour_are_refused(key, value, monkeypatch):
    monkeypatch.setenv(f"FSDP_{key}", value)
    with pytest.raises(NotImplementedError, match=f"fsdp_{key.lower()}"):
        sharding.check_supported(fake_accelerator("fsdp", monkeypatch))

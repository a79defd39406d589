"""Every model family users bring, end to end on a tiny random model built from transformers' own
config class: SFT (LoRA) → GRPO with a rule reward → export → strict reload; plus the MoE and
vision-language specifics (LoRA targets, router loss, Auto class, frozen vision tower)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.export import export_model
from alignkit.export.config import ExportConfig
from alignkit.models.architectures import auto_class_for, expert_parameters, forward_with_aux, router_modules
from alignkit.models.loading import build_policy_model, load_causal_lm
from alignkit.models.reward_model import RewardModel
from alignkit.models.tiny import build_tiny
from alignkit.train import dpo, kto, ppo, rm, sft
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES

TEXT_ARCHS = ["qwen3", "qwen3_moe", "llama3", "gemma3", "deepseek_v3"]
MOE_ARCHS = ["qwen3_moe", "deepseek_v3", "qwen3_vl_moe"]
VL_ARCHS = ["qwen3_vl", "qwen3_vl_moe"]
RULE = "def score(prompt, response, label):\n    return float('good' in response.lower())\n"
MEMO = [{"instruction": "Say the code word.", "input": "", "output": "The code word is good."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."}]


def tiny(tmp_path_factory, arch: str):
    # Small and briefly pretrained: enough to speak ChatML, fast enough to build per test module.
    return build_tiny(tmp_path_factory.mktemp(arch) / "model", arch=arch, hidden_size=64, intermediate_size=128,
                      num_layers=2, pretrain_steps=30)


@pytest.fixture(scope="module", params=TEXT_ARCHS + VL_ARCHS)
def model_dir(request, tmp_path_factory):
    return request.param, tiny(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "memo.json").write_text(json.dumps(MEMO * 4))
    (root / "rule.py").write_text(RULE)
    return root


def sft_config(model, data, out, *extra):
    return load_config(None, ["stage=sft", f"model_name_or_path={model}", f"dataset={data / 'memo.json'}",
                              "template=chatml", f"output_dir={out}", "per_device_train_batch_size=2",
                              "learning_rate=5e-3", "max_steps=3", "logging_steps=1", "save_steps=100",
                              "lora_rank=4", "lora_target=all", "report_to=none", "plot_loss=false", *extra])


def grpo_config(model, adapter, data, out):
    return load_config(EXAMPLES / "grpo_tiny.yaml", [
        f"model_name_or_path={model}", f"adapter_name_or_path={adapter}", f"output_dir={out}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", f"reward_model={data / 'rule.py'}:score",
        "lora_target=all", "max_steps=2", "num_generations=2", "per_device_train_batch_size=2", "ppo_buffer_size=1",
        "max_new_tokens=8", "save_steps=100"])


def test_sft_grpo_export_per_architecture(model_dir, data, tmp_path):
    arch, model = model_dir
    # 1. SFT with LoRA on every linear layer (and expert weight): the loss is finite and logged.
    adapter = sft.run(sft_config(model, data, tmp_path / "sft"))
    losses = [r["train/loss"] for r in read_metrics(adapter) if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    # 2. Two GRPO steps with a rule reward on top of the SFT adapter.
    run = ppo.run(grpo_config(model, adapter, data, tmp_path / "grpo"))
    rows = [r for r in read_metrics(run) if "env/reward_mean" in r]
    assert len(rows) == 2 and all(0.0 <= r["env/reward_mean"] <= 1.0 for r in rows)
    # 3. Export base + SFT + GRPO merged; it reloads strictly with the checkpoint's own Auto class.
    out = tmp_path / "export"
    report = export_model(ExportConfig(model_name_or_path=str(model), adapter_name_or_path=[str(adapter), str(run)],
                                       template="chatml", export_dir=str(out)))
    cls = auto_class_for(model)
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.architectures == cls.from_pretrained(model).config.architectures
    # ... and export's own verification (plain load with that class, weight names, logits) passes.
    assert report["passed"], report["verify"]
    # A VL export keeps the image processor next to the weights.
    assert report["processor_files"] == (["preprocessor_config.json"] if arch in VL_ARCHS else [])
    assert (out / "preprocessor_config.json").is_file() == (arch in VL_ARCHS)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_lora_all_adapts_experts_and_attention_not_the_router(arch, tmp_path_factory, data, tmp_path):
    model = tiny(tmp_path_factory, arch)
    policy = build_policy_model(sft_config(model, data, tmp_path / "x"))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    routers = router_modules(load_causal_lm(str(model)))
    assert routers, "the tiny MoE has routers"
    assert not any(f"{r}." in n for r in routers for n in trainable), "a router got a LoRA adapter"
    assert any(".experts." in n and "lora_A" in n for n in trainable), "experts are not adapted"
    assert any(".q_proj." in n or ".q_a_proj." in n for n in trainable), "attention is not adapted"
    assert expert_parameters(load_causal_lm(str(model))) == ["experts.down_proj", "experts.gate_up_proj"]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_ppo_with_a_value_head_on_a_moe_model(arch, tmp_path_factory, data, tmp_path):
    # PPO proper on a MoE base: the value head reads the policy's hidden states, the reference is
    # the adapter switched off; both go through the routed experts. Two steps, finite losses.
    model = tiny(tmp_path_factory, arch)
    cfg = load_config(EXAMPLES / "ppo_tiny.yaml", [
        f"model_name_or_path={model}", f"output_dir={tmp_path / 'ppo'}", f"dataset_dir={EXAMPLES / 'data'}",
        "adapter_name_or_path=null", "report_to=none", "plot_loss=false", f"reward_model={data / 'rule.py'}:score",
        "lora_target=all", "max_steps=2", "per_device_train_batch_size=2", "ppo_buffer_size=1", "max_new_tokens=8",
        "save_steps=100"])
    rows = [r for r in read_metrics(ppo.run(cfg)) if "env/reward_mean" in r]
    assert len(rows) == 2
    for key in ("ppo/loss/value", "ppo/loss/policy", "objective/kl"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), (key, rows)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # step 1: policy == reference


def test_moe_aux_loss_enters_the_sft_loss(tmp_path_factory, data, tmp_path):
    model = tiny(tmp_path_factory, "qwen3_moe")
    plain = sft.run(sft_config(model, data, tmp_path / "plain", "max_steps=1"))
    with_aux = sft.run(sft_config(model, data, tmp_path / "aux", "max_steps=1", "moe_aux_loss_coef=0.5"))
    before = next(r for r in read_metrics(plain) if "train/loss" in r)
    after = next(r for r in read_metrics(with_aux) if "train/loss" in r)
    assert "train/aux_loss" not in before and after["train/aux_loss"] > 0
    # Same data and weights at step 1: the total differs by exactly the weighted router loss.
    assert after["train/loss"] == pytest.approx(before["train/loss"] + after["train/aux_loss"], rel=1e-4)


def first_step_losses(model, stage, example: str, *extra) -> tuple[dict, dict]:
    """Step-1 metrics of ``stage`` on the tiny MoE without and with ``moe_aux_loss_coef=0.5``."""
    runs = {"dpo": dpo.run, "kto": kto.run, "rm": rm.run}

    def run(name, *more):
        cfg = load_config(EXAMPLES / example, [
            f"model_name_or_path={model}", f"dataset_dir={EXAMPLES / 'data'}", f"output_dir={model.parent / name}",
            "report_to=none", "plot_loss=false", "per_device_train_batch_size=2", "max_steps=1", "logging_steps=1",
            "save_steps=100", "val_size=0", "eval_strategy=no", "max_samples=4", *extra, *more])
        return next(r for r in read_metrics(runs[stage](cfg)) if "train/loss" in r)

    return run(f"{stage}_plain"), run(f"{stage}_aux", "moe_aux_loss_coef=0.5")


@pytest.mark.parametrize(("stage", "example"), [("dpo", "dpo_tiny.yaml"), ("kto", "kto_tiny.yaml"),
                                                ("rm", "rm_tiny.yaml")])
def test_moe_aux_loss_enters_the_preference_and_reward_losses(stage, example, tmp_path_factory):
    # The reward model runs the backbone without its LM head, which returns router logits but no
    # loss: alignkit computes it with transformers' own load_balancing_loss_func.
    model = tiny(tmp_path_factory, "qwen3_moe")
    before, after = first_step_losses(model, stage, example)
    assert "train/aux_loss" not in before and after["train/aux_loss"] > 0
    # Step 1 (a zero LoRA update, the same seeded score head): the total differs from the plain loss
    # by exactly the weighted router loss.
    assert after["train/loss"] == pytest.approx(before["train/loss"] + after["train/aux_loss"], rel=1e-4)


def test_moe_aux_loss_of_a_reward_model_equals_the_causal_lms(tmp_path_factory):
    # The same tokens through the causal LM (whose head computes aux_loss) and the RM's backbone.
    model = tiny(tmp_path_factory, "qwen3_moe")
    lm = load_causal_lm(str(model))
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        want = lm(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
        _, got = RewardModel.from_causal_lm(lm)(ids, mask, aux_coef=0.5)
    assert float(got) == pytest.approx(0.5 * float(want), rel=1e-6)


def test_moe_aux_loss_on_a_model_without_one_is_an_error(tmp_path_factory):
    lm = load_causal_lm(str(tiny(tmp_path_factory, "deepseek_v3")))  # balances experts with a bias, no loss
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="DeepseekV3ForCausalLM computes no router load-balancing loss"):
        forward_with_aux(lm, 0.5, input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("arch", VL_ARCHS)
def test_vl_checkpoint_loads_as_image_text_to_text_with_frozen_vision(arch, tmp_path_factory, data, tmp_path):
    model = tiny(tmp_path_factory, arch)
    assert auto_class_for(model) is AutoModelForImageTextToText
    lm = load_causal_lm(str(model))
    assert type(lm).__name__.endswith("ForConditionalGeneration")
    policy = build_policy_model(sft_config(model, data, tmp_path / "x"))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and not any(".visual." in n for n in trainable), "LoRA reached the vision tower"
    assert any("language_model" in n for n in trainable)
    full = build_policy_model(sft_config(model, data, tmp_path / "y", "finetuning_type=full"))
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen and all(".visual." in n for n in frozen)
    unfrozen = build_policy_model(sft_config(model, data, tmp_path / "z", "finetuning_type=full",
                                             "freeze_vision_tower=false", "freeze_multi_modal_projector=false"))
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_unsupported_architecture_is_named(tmp_path, data):
    bad = tmp_path / "vit"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTForImageClassification"]}))
    with pytest.raises(ValueError, match="'vit' checkpoint .*ViTForImageClassification"):
        load_causal_lm(str(bad))


def test_tiny_cli_builds_each_family(tmp_path):
    assert main(["tiny", str(tmp_path / "m"), "--arch", "gemma3", "--hidden-size", "32", "--layers", "2",
                 "--pretrain-steps", "0"]) == 0
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "m")).__name__ == "Gemma3ForCausalLM"

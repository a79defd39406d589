"""The model builder and weight I/O on the tiny real model: sharded weights restore strictly,
adapters are merged or continued as each stage needs, the critic adapter gets its own LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from alignkit.config import load_config
from alignkit.models.actor_critic import CRITIC, build_actor_critic
from alignkit.models.io import WEIGHTS_INDEX, read_weights, restore_model
from alignkit.models.loading import build_policy_model, load_base, load_causal_lm
from tests.conftest import EXAMPLES

IDS = torch.tensor([[1, 40, 41, 42, 2]])


def config(model_dir, stage="sft", **kw):
    args = dict(stage=stage, model_name_or_path=str(model_dir), dataset="sft_demo", dataset_dir=str(EXAMPLES / "data"),
                output_dir="unused", lora_rank=4, lora_target="all")
    if stage == "ppo":
        args.update(dataset="prompts_demo", reward_model="length_penalty")
    args.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in args.items()])


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter whose B matrices are not zero, so merging it changes the model."""
    model = build_policy_model(config(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    out = tmp_path_factory.mktemp("adapter") / "sft"
    model.save_pretrained(out)
    return out


def test_sharded_weights_restore_strictly(tiny_model_dir, tmp_path):
    model = load_causal_lm(str(tiny_model_dir))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / WEIGHTS_INDEX).is_file(), "the test needs a sharded checkpoint"
    assert read_weights(tmp_path / "sharded").keys() == model.state_dict().keys() - {"lm_head.weight"}

    fresh = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    restore_model(fresh, tmp_path / "sharded")
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits)

    other = load_causal_lm(str(tiny_model_dir))
    other.extra = torch.nn.Linear(2, 2)  # a key the checkpoint lacks
    with pytest.raises(RuntimeError, match="missing keys.*extra"):
        restore_model(other, tmp_path / "sharded")


def test_builder_continues_or_merges_the_adapter(tiny_model_dir, sft_adapter):
    merged = load_base(config(tiny_model_dir, adapter_name_or_path=sft_adapter)).eval()
    plain = load_causal_lm(str(tiny_model_dir)).eval()
    assert not torch.allclose(merged(IDS).logits, plain(IDS).logits)

    # SFT/RM continue the last adapter: it is the trainable one, with its saved weights.
    continued = build_policy_model(config(tiny_model_dir, adapter_name_or_path=sft_adapter)).eval()
    assert isinstance(continued, PeftModel)
    torch.testing.assert_close(continued(IDS).logits, merged(IDS).logits, atol=1e-5, rtol=1e-5)
    assert any(p.requires_grad and p.abs().sum() > 0 for n, p in continued.named_parameters() if "lora_B" in n)

    # PPO merges every adapter and starts a new one (B = 0), so "adapter off" is the SFT model.
    policy = build_policy_model(config(tiny_model_dir, adapter_name_or_path=sft_adapter), merge_all=True).eval()
    assert all(p.abs().sum() == 0 for n, p in policy.named_parameters() if "lora_B" in n)
    torch.testing.assert_close(policy(IDS).logits, merged(IDS).logits, atol=1e-5, rtol=1e-5)


def test_lora_trains_in_float32_on_a_bf16_base(tiny_model_dir):
    model = build_policy_model(config(tiny_model_dir, bf16="true", gradient_checkpointing="true"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    assert model.is_gradient_checkpointing


def test_critic_adapter_on_all_linear_layers(tiny_model_dir):
    cfg = config(tiny_model_dir, stage="ppo", critic_adapter="true")
    ac = build_actor_critic(build_policy_model(cfg, merge_all=True), cfg)
    critic = {n for n, p in ac.lm.named_parameters() if f".{CRITIC}." in n and p.requires_grad}
    policy = {n for n, p in ac.lm.named_parameters() if ".default." in n and p.requires_grad}
    assert critic and {n.replace(f".{CRITIC}.", ".default.") for n in critic} == policy

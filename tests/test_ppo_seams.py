"""The RL step's seams are real: an estimator, a policy loss and a rollout engine, each added
from outside the package through its registry alone, drive a real PPO step, with the defaults
their specs carry."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from alignkit.algos.advantages import (
    ESTIMATOR_ALIASES,
    ESTIMATORS,
    AdvantageInputs,
    AdvantageParams,
    register_estimator,
)
from alignkit.algos.losses import LOSS_ALIASES, POLICY_LOSSES, LossInputs, register_loss
from alignkit.config import ConfigError, load_config
from alignkit.generation import (
    ENGINES,
    EngineContext,
    EngineSettings,
    Rollout,
    SamplingParams,
    first_eos_mask,
    register_engine,
)
from alignkit.generation.registry import VLLMSettings
from alignkit.models.loading import load_tokenizer
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES


def one_step_config(model_dir, out, *overrides):
    return load_config(EXAMPLES / "ppo_tiny.yaml", [
        f"model_name_or_path={model_dir}", "adapter_name_or_path=null", f"output_dir={out}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", "max_steps=1",
        "max_new_tokens=6", "ppo_buffer_size=1", "ppo_epochs=1", *overrides])


@pytest.fixture
def toy_estimator():
    calls = []

    def plus_one(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid token gets advantage +1; the critic's targets are its own values."""
        calls.append(inputs.mask.shape)
        return inputs.mask.clone(), inputs.values.clone()

    register_estimator("plus_one", plus_one)
    yield calls
    del ESTIMATORS["plus_one"]


def test_estimator_added_through_the_registry_runs_a_ppo_step(tiny_model_dir, tmp_path, toy_estimator):
    out = ppo.run(one_step_config(tiny_model_dir, tmp_path / "toy", "advantage_estimator=plus_one"))
    assert len(toy_estimator) == 1  # the loop called the registered function, once per step
    row = read_metrics(out)[0]
    assert row["ppo/advantages_mean"] == pytest.approx(1.0)
    assert row["ppo/loss/policy"] == pytest.approx(-1.0, abs=1e-3)  # -A * ratio with ratio ~1 at the first epoch


def test_unknown_estimator_fails_at_config_load(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="advantage_estimator.*gae"):
        one_step_config(tiny_model_dir, tmp_path / "x", "advantage_estimator=gea")


class ScriptedEngine:
    """A rollout engine that answers every prompt with the same scripted tokens."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.reply = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.synced = 0

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams,
                 pixels: dict | None = None) -> Rollout:
        reply = (self.reply + [sampling.eos_ids[0]])[: sampling.max_new_tokens]
        response = torch.tensor([reply] * query_ids.shape[0], device=query_ids.device)  # (B, R)
        response_mask, no_eos = first_eos_mask(response, list(sampling.eos_ids))
        return Rollout(torch.cat([query_ids, response], 1), torch.cat([query_mask, response_mask], 1),
                       response_mask, no_eos, query_ids.shape[1])

    def sync_weights(self, policy: torch.nn.Module) -> None:
        self.synced += 1

    def check_sync(self, rollouts, trainer_logprobs, sampling) -> None:
        return None  # it reports no log-probs of its own

    def close(self) -> None:
        return None


def test_stub_rollout_engine_drives_a_ppo_step(tiny_model_dir, tmp_path):
    engine = ScriptedEngine(load_tokenizer(str(tiny_model_dir)), "good good good")
    out = ppo.run(one_step_config(tiny_model_dir, tmp_path / "stub", "max_steps=2"), engine=engine)
    rows = read_metrics(out)
    assert [r["env/reward_mean"] for r in rows] == [3.0, 3.0]  # count_good scored the engine's text
    assert rows[0]["rollout/no_eos_frac"] == 0.0
    assert rows[0]["rollout/response_len_mean"] == len(engine.reply) + 1  # reply + EOS
    assert engine.synced == 2  # told about every update


@pytest.fixture
def toy_loss():
    calls = []

    def reinforce(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Plain REINFORCE, -A * logp, with its own default aggregation."""
        calls.append(x.loss_agg_mode)
        zero = torch.zeros((), device=x.logprobs.device)
        return x.aggregate(-x.advantages * x.logprobs), {"approxkl": zero, "clipfrac": zero}

    register_loss("toy_reinforce", reinforce, aliases=("toy_pg",), loss_agg_mode="seq_mean_token_mean")
    yield calls
    del POLICY_LOSSES["toy_reinforce"], LOSS_ALIASES["toy_pg"]


def test_loss_added_through_the_registry_runs_a_step_with_its_own_defaults(tiny_model_dir, tmp_path, toy_loss):
    cfg = one_step_config(tiny_model_dir, tmp_path / "toy_loss", "policy_loss=toy_pg")
    assert cfg.policy_loss == "toy_reinforce" and cfg.loss_agg_mode == "seq_mean_token_mean"  # alias, spec default
    out = ppo.run(cfg)
    assert toy_loss and set(toy_loss) == {"seq_mean_token_mean"}  # the update called it, with its default
    assert read_metrics(out)[0]["ppo/policy/clipfrac"] == 0.0


@pytest.fixture
def grouped_toy_estimator():
    def centred(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Score minus the batch mean, on every token (a group-free toy)."""
        adv = (inputs.scores - inputs.scores.mean())[:, None] * inputs.mask
        return adv, adv

    register_estimator("toy_centred", centred, needs_critic=False, needs_groups=True, kl_in_loss=True,
                       loss_agg_mode="seq_mean_token_sum_norm", beta=0.123, aliases=("toy_c",))
    yield
    del ESTIMATORS["toy_centred"], ESTIMATOR_ALIASES["toy_c"]


def bare_config(model_dir, out, *overrides):
    """A PPO config that sets none of the keys a spec has defaults for."""
    return load_config(None, ["stage=ppo", f"model_name_or_path={model_dir}", "dataset=prompts_demo",
                              f"dataset_dir={EXAMPLES / 'data'}", f"output_dir={out}", "template=chatml",
                              "reward_model_type=rule", "reward_model=count_good", *overrides])


def test_estimator_spec_carries_its_defaults_into_the_config(tiny_model_dir, tmp_path, grouped_toy_estimator):
    cfg = bare_config(tiny_model_dir, tmp_path / "c", "advantage_estimator=toy_c", "num_generations=2")
    assert (cfg.advantage_estimator, cfg.use_kl_loss, cfg.init_kl_coef, cfg.adap_kl_ctrl, cfg.loss_agg_mode,
            cfg.has_critic) == ("toy_centred", True, 0.123, False, "seq_mean_token_sum_norm", False)
    with pytest.raises(ConfigError, match="compares responses to the same prompt"):  # needs_groups, read from the spec
        one_step_config(tiny_model_dir, tmp_path / "c1", "advantage_estimator=toy_centred", "num_generations=1")
    # An explicit key wins over the spec, and the loss's default over the estimator's.
    cfg = bare_config(tiny_model_dir, tmp_path / "c2", "advantage_estimator=toy_c", "num_generations=2",
                      "beta=0.5", "policy_loss=gspo")
    assert (cfg.init_kl_coef, cfg.loss_agg_mode, cfg.clip_range) == (0.5, "seq_mean_token_mean", (3e-4, 4e-4))
    out = ppo.run(one_step_config(tiny_model_dir, tmp_path / "run", "advantage_estimator=toy_c", "num_generations=2"))
    assert "ppo/loss/kl" in read_metrics(out)[0]  # the KL sits in the loss, as the spec said


def test_unknown_policy_loss_fails_at_config_load_with_a_suggestion(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="policy_loss.*did you mean 'gspo'.*cispo, gspo, ppo"):
        one_step_config(tiny_model_dir, tmp_path / "x", "policy_loss=gpso")


def test_rollout_block_flat_aliases_and_errors(tiny_model_dir, tmp_path):
    cfg = one_step_config(tiny_model_dir, tmp_path / "a", "rollout_engine=vllm", "vllm_gpu_util=0.5",
                          "vllm_maxlen=256")
    assert isinstance(cfg.rollout, VLLMSettings)
    assert (cfg.rollout.engine, cfg.rollout.gpu_memory_utilization, cfg.rollout.max_model_len) == ("vllm", 0.5, 256)
    cfg = one_step_config(tiny_model_dir, tmp_path / "b", "rollout.engine=vllm", "rollout.tensor_parallel_size=2")
    assert cfg.rollout.tensor_parallel_size == 2
    assert "rollout" in cfg.model_dump() and cfg.model_dump()["rollout"]["tensor_parallel_size"] == 2  # saved whole
    with pytest.raises(ConfigError, match=r"rollout\.gpu_memory_utilization.*less than or equal to 1.*"
                                          r"unknown key rollout\.tensor_parallel for engine vllm"):
        one_step_config(tiny_model_dir, tmp_path / "c", "rollout.engine=vllm", "rollout.gpu_memory_utilization=2",
                        "rollout.tensor_parallel=2")
    with pytest.raises(ConfigError, match="unknown rollout engine 'sglang'; registered: hf, vllm"):
        one_step_config(tiny_model_dir, tmp_path / "d", "rollout.engine=sglang")


class ScriptedSettings(EngineSettings):
    engine: Literal["scripted"] = "scripted"
    text: str = "good good good"


@pytest.fixture
def scripted_engine_registered():
    built = []

    def build(settings: ScriptedSettings, policy, ctx: EngineContext):
        built.append(ScriptedEngine(load_tokenizer(ctx.model_name_or_path), settings.text))
        return built[-1]

    register_engine("scripted", ScriptedSettings, build)
    yield built
    del ENGINES["scripted"]


def test_engine_added_through_the_registry_is_built_from_the_config(tiny_model_dir, tmp_path,
                                                                    scripted_engine_registered):
    out = ppo.run(one_step_config(tiny_model_dir, tmp_path / "reg", "rollout.engine=scripted",
                                  "rollout.text=good good", "max_steps=2"))
    assert [r["env/reward_mean"] for r in read_metrics(out)] == [2.0, 2.0]
    assert scripted_engine_registered[0].synced == 2


def test_a_ppo_step_prints_no_kv_cache_deprecation(tiny_model_dir, tmp_path):
    # transformers 5.2x renamed forward's past_key_values to cache and warns on every decode step.
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ppo.run(one_step_config(tiny_model_dir, tmp_path / "quiet"))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_checkpoints_layers_in_the_update(tiny_model_dir, tmp_path, checkpointing):
    # The models stay in eval mode (no dropout), where transformers would skip checkpointing: with
    # gradient_checkpointing each decoder layer's forward must go through the checkpoint function.
    from transformers.modeling_layers import GradientCheckpointingLayer

    cfg = one_step_config(tiny_model_dir, tmp_path / "gc", f"gradient_checkpointing={str(checkpointing).lower()}")
    ac = ppo.build_models(cfg)
    layers = [m for m in ac.modules() if isinstance(m, GradientCheckpointingLayer)]
    calls = []
    for layer in layers:
        if checkpointing:
            real = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, real=real, **k: calls.append(1) or real(*a, **k)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits, _ = ac(ids, torch.ones_like(ids), 2)
    logits.float().logsumexp(-1).sum().backward()
    assert len(calls) == (len(layers) if checkpointing else 0)
    assert not any(m.training for m in ac.modules() if isinstance(m, torch.nn.Dropout))


def test_sampling_builds_no_autograd_graph(tiny_model_dir):
    # The KV-cache loop runs under inference mode: a graph per decode step would cost time and memory.
    from alignkit.generation import sample
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), torch.float32, False)
    q = torch.tensor([[5, 6, 7]])
    out = sample(model, 0, q, torch.ones_like(q), 4, 1.0, 0, 1.0, [1])
    assert out.input_ids.is_inference() and not out.input_ids.requires_grad

"""The PPO step's seams are real: an estimator added through the registry alone, and a rollout
engine the loop knows only through ``RolloutEngine``, each drive a real PPO step."""

from __future__ import annotations

import pytest
import torch

from alignkit.algos.advantages import ESTIMATORS, AdvantageInputs, AdvantageParams, register_estimator
from alignkit.config import ConfigError, load_config
from alignkit.generation import Rollout, SamplingParams, first_eos_mask
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

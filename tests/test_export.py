"""``alignkit export``: merged weights equal base + adapters, heads dropped, shards valid, strict reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.data.templates import TEMPLATES, get_template
from alignkit.export import (
    ExportConfig,
    export_model,
    system_override_jinja,
    template_jinja,
    verify_export,
)
from alignkit.models.loading import load_causal_lm, merge_adapters
from alignkit.runs import build_spec
from alignkit.tools.config import load_tool_config

SYSTEM = "You are a tiny bot."
PROMPT_IDS = [[1, 20, 30, 40, 50, 60, 70, 2], [5, 6, 7, 8]]


def _write_run(out: Path, **cfg) -> None:
    (out / "alignkit_config.yaml").write_text(yaml.safe_dump({"template": "chatml", "default_system": None, **cfg}))


def make_lora(model, out: Path, seed: int) -> Path:
    """A peft adapter with non-zero B (a fresh LoRA is a no-op and would hide a wrong merge)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(out)
    return out


def build_runs(base: Path, root: Path) -> dict[str, Path]:
    """SFT LoRA run, PPO run on top of it (with value head + critic adapter), full fine-tune run."""
    sft = make_lora(load_causal_lm(str(base)), root / "sft", seed=1)
    _write_run(sft, stage="sft", model_name_or_path=str(base), adapter_name_or_path=None,
               default_system=SYSTEM, finetuning_type="lora")
    ppo = make_lora(merge_adapters(load_causal_lm(str(base)), [str(sft)]), root / "ppo", seed=2)
    _write_run(ppo, stage="ppo", model_name_or_path=str(base), adapter_name_or_path=[str(sft)], finetuning_type="lora")
    save_file({"summary.weight": torch.randn(1, 128), "summary.bias": torch.zeros(1)}, str(ppo / "value_head.safetensors"))
    make_lora(load_causal_lm(str(base)), ppo / "critic_adapter", seed=3)
    full = root / "full"
    model = load_causal_lm(str(base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(full)
    AutoTokenizer.from_pretrained(base).save_pretrained(full)
    _write_run(full, stage="sft", model_name_or_path=str(base), adapter_name_or_path=None, finetuning_type="full")
    return {"base": base, "sft": sft, "ppo": ppo, "full": full}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    return build_runs(tiny_model_dir, tmp_path_factory.mktemp("runs"))


def logits(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0] for ids in PROMPT_IDS]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def strict_load(out: Path):
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def all_keys(out: Path) -> list[str]:
    keys = []
    for f in out.glob("model*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys += list(st.keys())
    return keys


def test_sft_adapter_export_matches_peft_and_bakes_the_system_prompt(runs, tmp_path):
    out = tmp_path / "export"
    cfg = ExportConfig(model_name_or_path=str(runs["base"]), adapter_name_or_path=str(runs["sft"]),
                       export_dir=str(out), default_system="Be brief.")
    report = export_model(cfg)
    assert report["passed"] is True and report["verify"]["logits"]["max_abs_diff"] < 1e-4
    assert json.loads((out / "export_report.json").read_text())["passed"] is True

    reference = PeftModel.from_pretrained(load_causal_lm(str(runs["base"])), str(runs["sft"])).eval()
    exported = strict_load(out)
    assert max_diff(logits(exported), logits(reference)) < 1e-4
    with reference.disable_adapter():
        assert max_diff(logits(exported), logits(reference)) > 1e-3  # the adapter really changed something

    # The run's template (chatml, read from the adapter's run config) with the override as default system.
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


def test_sft_then_ppo_export_from_run_dir_is_sharded_and_headless(runs, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--from", str(runs["ppo"]), "--export_dir", str(out), "export_size=0.001"]) == 0
    assert "PASSED" in capsys.readouterr().out

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("model*.safetensors")) == shards
    keys = all_keys(out)
    assert sorted(keys) == sorted(index["weight_map"])
    assert not [k for k in keys if any(s in k for s in ("v_head", "summary", "pretrained_model.", "base_model.model.",
                                                       "lora_", "score"))]
    assert (out / "extras" / "value_head.safetensors").is_file() and (out / "extras" / "critic_adapter").is_dir()

    exported = strict_load(out)
    assert exported.config.architectures == ["Qwen2ForCausalLM"]
    # Reference: PPO adapter unmerged on base + SFT, exactly as PPO trained it.
    base_sft = merge_adapters(load_causal_lm(str(runs["base"])), [str(runs["sft"])])
    reference = PeftModel.from_pretrained(base_sft, str(runs["ppo"])).eval()
    assert max_diff(logits(exported), logits(reference)) < 1e-4
    with reference.disable_adapter():
        assert max_diff(logits(exported), logits(reference)) > 1e-3


def test_full_finetune_export_in_bf16(runs, tmp_path):
    out = tmp_path / "export"
    report = export_model(ExportConfig(run_dir=str(runs["full"]), export_dir=str(out), export_dtype="bfloat16"))
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    assert report["verify"]["logits"]["tolerance_rule"].startswith("0.02")
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out / "model.safetensors")).values())
    full = load_causal_lm(str(runs["full"])).eval()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_diff(logits(exported), logits(full)) < 0.1


def test_verify_catches_a_wrong_weight(runs, tmp_path):
    out = tmp_path / "export"
    cfg = ExportConfig(run_dir=str(runs["sft"]), export_dir=str(out), verify=False)
    assert export_model(cfg)["passed"] is None
    state = load_file(str(out / "model.safetensors"))
    name = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.weight"))
    state[name] = state[name] + 0.5
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    checks = verify_export(out, cfg.model_spec(), torch.float32)
    assert checks["plain_load"]["ok"] and not checks["logits"]["ok"]


def test_reward_model_run_exports_as_sequence_classifier(runs, tmp_path):
    from alignkit.models.reward_model import RewardModel, load_reward_model, save_reward_model

    base = runs["base"]
    rm_dir = tmp_path / "rm"
    lora = make_lora(load_causal_lm(str(base)), tmp_path / "scratch", seed=4)
    rm = RewardModel(PeftModel.from_pretrained(load_causal_lm(str(base)), str(lora)))
    save_reward_model(rm, rm_dir, AutoTokenizer.from_pretrained(base),
                      {"base_model": str(base), "merged_adapters": [], "template": "chatml"})
    _write_run(rm_dir, stage="rm", model_name_or_path=str(base), adapter_name_or_path=None, finetuning_type="lora")

    out = tmp_path / "export"
    report = export_model(ExportConfig(run_dir=str(rm_dir), export_dir=str(out)))
    assert report["passed"] is True, report["verify"]
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and model.config.num_labels == 1
    assert model.config.architectures == ["Qwen2ForSequenceClassification"]
    ids = torch.tensor([PROMPT_IDS[0]])
    with torch.no_grad():
        want = load_reward_model(rm_dir)[0](ids, torch.ones_like(ids))
        assert abs(float(model(ids).logits[0, 0]) - float(want[0])) < 1e-4


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_chat_template_renders_like_the_template(name, runs):
    tok = AutoTokenizer.from_pretrained(runs["base"])
    template = get_template(name)
    tok.chat_template = template_jinja(template, "Default sys.", tok.eos_token)
    convs = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Own sys."}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "<think>\nhm\n</think>\n\nb"}, {"role": "tool", "content": "t"},
         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    ]
    for msgs in convs:
        for gen_prompt in (True, False):
            for thinking in (None, False):
                kwargs = {} if thinking is None else {"enable_thinking": thinking}
                want = "".join(t for t, _ in template.segments(msgs, "Default sys." if msgs[0]["role"] != "system"
                                                                else None, gen_prompt, thinking, tokenizer=tok))
                got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt, **kwargs)
                assert got == want, (name, msgs, gen_prompt, thinking)


def test_system_override_wraps_the_tokenizers_own_template(runs):
    tok = AutoTokenizer.from_pretrained(runs["base"])
    tok.chat_template = system_override_jinja(tok.chat_template, 'Say "hi"\nplease.')
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert text.startswith('<|im_start|>system\nSay "hi"\nplease.<|im_end|>\n<|im_start|>user\nx')
    own = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "x"}], tokenize=False)
    assert own.startswith("<|im_start|>system\nS<|im_end|>")


def test_config_errors_and_vllm_skip(runs, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'export_dir'"):
        load_tool_config(ExportConfig, None, [f"run_dir={runs['sft']}", "export_dri=x"])
    with pytest.raises(ConfigError, match="not both"):
        load_tool_config(ExportConfig, None, [f"run_dir={runs['sft']}", f"model_name_or_path={runs['base']}",
                                              "export_dir=x"])
    with pytest.raises(ValueError, match="one of the inputs"):
        export_model(ExportConfig(run_dir=str(runs["sft"]), export_dir=str(runs["sft"])))
    # A PPO adapter alone (without its SFT adapter) is applied as given, with a warning.
    assert build_spec(str(runs["base"]), [str(runs["ppo"])]).adapters == [str(runs["ppo"])]
    report = export_model(ExportConfig(run_dir=str(runs["sft"]), export_dir=str(tmp_path / "e"), verify=False,
                                       vllm_check=True))
    if not torch.cuda.is_available():
        assert report["vllm"]["status"].startswith("skipped: no GPU/vLLM")


def test_runs_read_config_from_a_checkpoint_and_list_complete_checkpoints(runs, tmp_path):
    from alignkit.runs import read_run_config, resolve_run
    from alignkit.train.checkpoint import STATE_FILE, list_checkpoints

    run = tmp_path / "run"
    (run / "checkpoint-7").mkdir(parents=True)
    _write_run(run, stage="sft", model_name_or_path=str(runs["base"]))
    cfg, path = read_run_config(run / "checkpoint-7")
    assert cfg["stage"] == "sft" and path == run / "alignkit_config.yaml"
    assert read_run_config(runs["base"]) is None
    assert resolve_run(runs["ppo"]).adapters == [str(runs["sft"]), str(runs["ppo"])]
    for step, complete in [(10, True), (2, True), (11, False)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_bytes(b"")
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert list_checkpoints(tmp_path / "absent") == []

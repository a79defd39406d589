"""LLaMA-Factory users' configs, reward servers and habits: keys, reward type inference, the exact
text full-text presets send, think tags that are special tokens, and errors without tracebacks.

The end-to-end section runs YAML files written the way LLaMA-Factory's examples are (paths
changed to the tiny model) through ``alignkit train`` / ``alignkit export``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.config import (
    ALIASES,
    IGNORED_KEYS,
    LAZY_STAGES,
    LLAMAFACTORY_KEYS,
    STAGES,
    UNSUPPORTED_KEYS,
    ConfigError,
    load_config,
    save_config,
)
from alignkit.data.chat_format import ChatFormat
from alignkit.data.encode import encode_prompt
from alignkit.data.loader import Example
from alignkit.data.templates import TEMPLATES, AutoTemplate, get_template
from alignkit.judge.server import start_judge_server
from alignkit.models.loading import load_tokenizer
from alignkit.rewards.api.client import build_api_reward
from alignkit.rewards.api.config import parse_reward_api
from alignkit.rewards.api.presets import make_preset
from alignkit.rewards.base import ScoreMeta
from alignkit.rewards.service import RewardService, build_reward_service
from alignkit.rewards.spec import RewardContext, RewardSpec
from tests.conftest import EXAMPLES

SYSTEM = "You are terse."
PPO = {"stage": "ppo", "model_name_or_path": "/m", "dataset": "a", "output_dir": "/o"}


def supported_keys() -> set[str]:
    """Fields of every stage and tool config, and the aliases."""
    from alignkit.export.config import ExportConfig
    from alignkit.tools.compare import CompareConfig
    from alignkit.tools.infer import PredictConfig

    for module in LAZY_STAGES.values():
        importlib.import_module(module)
    configs = [*STAGES.values(), ExportConfig, PredictConfig, CompareConfig]
    return {k for c in configs for k in c.model_fields} | set(ALIASES)


# -- every LLaMA-Factory key has an answer -------------------------------------------------


def test_every_llamafactory_key_falls_in_exactly_one_class():
    listed = [k for section in LLAMAFACTORY_KEYS["keys"].values() for k in section]
    assert len(listed) > 250 and len(listed) == len(set(listed))
    classes = {"supported": supported_keys(), "ignored": set(IGNORED_KEYS), "unsupported": set(UNSUPPORTED_KEYS)}
    for key in listed:
        found = [name for name, keys in classes.items() if key in keys]
        assert len(found) == 1, f"{key}: {found or 'no class'}"
    assert all(IGNORED_KEYS.values()) and all(UNSUPPORTED_KEYS.values())  # each says why


def test_all_problem_keys_named_at_once_and_ignored_keys_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="alignkit.config"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{k}={v}" for k, v in PPO.items()] + [
                "reward_model=count_good", "quantization_bit=4", "use_dora=true", "deepspeed=ds.json",
                "lerning_rate=1e-4", "save_strategy=steps"])
    message = str(err.value)
    for key in ("quantization_bit", "use_dora", "deepspeed"):
        assert f"key {key!r} is not supported" in message
    assert "unknown key 'lerning_rate'; did you mean 'learning_rate'?" in message
    assert "these 4 keys" in message and "\n" not in message
    assert "save_strategy" in caplog.text  # accepted, one warning


def test_did_you_mean_never_points_at_an_unrelated_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["stage=sft", "model_name_or_path=/m", "dataset=a", "output_dir=/o", "ref_model=/r"])
    assert "key 'ref_model' belongs to stage" in str(err.value) and "reward_model" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown key 'reward_modle'; did you mean 'reward_model'"):
        load_config(None, [f"{k}={v}" for k, v in PPO.items()] + ["reward_model=count_good", "reward_modle=x"])
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{k}={v}" for k, v in PPO.items()] + ["reward_model=count_good", "ref_modle_dir=/r"])
    assert "did you mean 'reward_model" not in str(err.value)


def test_do_sample_false_is_an_error_true_is_accepted():
    base = [f"{k}={v}" for k, v in PPO.items()] + ["reward_model=count_good"]
    assert load_config(None, base + ["do_sample=true"]).temperature == 1.0
    with pytest.raises(ConfigError, match="'do_sample' is not supported"):
        load_config(None, base + ["do_sample=false"])


def test_warmup_steps_below_one_is_a_ratio():
    cfg = load_config(None, [f"{k}={v}" for k, v in PPO.items()] + ["reward_model=count_good", "warmup_steps=0.1"])
    assert cfg.warmup_steps == 0 and cfg.warmup_ratio == 0.1
    assert load_config(None, [f"{k}={v}" for k, v in PPO.items()] + ["reward_model=count_good",
                                                                     "warmup_steps=20"]).warmup_steps == 20


def test_fp16_on_cpu_warns_how_to_turn_it_off(caplog):
    with caplog.at_level(logging.WARNING, logger="alignkit.config"):
        load_config(None, [f"{k}={v}" for k, v in PPO.items()] + ["reward_model=count_good", "fp16=true"])
    assert "fp16: true on a CPU" in caplog.text and "fp16: false" in caplog.text


def test_saved_config_keeps_the_env_template_never_the_value(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-live-value-123")
    cfg = load_config(None, [f"{k}={v}" for k, v in PPO.items()] + [
        "reward_model=http://127.0.0.1:1/score", "reward_api.headers.Authorization=Bearer ${JUDGE_KEY}"])
    text = save_config(cfg, tmp_path).read_text()
    assert "Bearer ${JUDGE_KEY}" in text and "sk-live-value-123" not in text


# -- reward type inference -----------------------------------------------------------------


@pytest.mark.parametrize(("make", "finetuning", "expected"), [
    (lambda d: "http://127.0.0.1:9/score", "lora", "api"),
    (lambda d: "count_good", "lora", "rule"),
    (lambda d: "my_rules:score", "lora", "rule"),
    (lambda d: _touch(d, "adapter_config.json"), "lora", "lora"),
    (lambda d: _touch(d, "adapter_config.json"), "full", "full"),
    (lambda d: _touch(d, "config.json"), "lora", "full"),
])
def test_reward_type_is_inferred(tmp_path, make, finetuning, expected):
    cfg = load_config(None, [f"{k}={v}" for k, v in PPO.items()] + [f"reward_model={make(tmp_path)}",
                                                                     f"finetuning_type={finetuning}"])
    assert cfg.reward_model_type == expected


def test_unusable_reward_model_names_what_it_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    for value, expected in [(tmp_path / "empty", "neither adapter_config.json"), ("saves/rm", r"not an http\(s\) URL")]:
        with pytest.raises(ConfigError, match=expected):
            load_config(None, [f"{k}={v}" for k, v in PPO.items()] + [f"reward_model={value}"])


def _touch(d: Path, name: str) -> str:
    d = d / "rm"
    d.mkdir(exist_ok=True)
    (d / name).write_text("{}")
    return str(d)


def test_url_only_means_the_llamafactory_shape():
    spec = RewardSpec(reward_model="http://127.0.0.1:9/score")
    assert spec.reward_model_type == "api" and spec.api_settings().preset == "llamafactory"
    with_block = RewardSpec(reward_model="http://127.0.0.1:9/score", reward_api={"timeout_s": 3})
    assert with_block.api_settings().preset == "alignkit"


def test_missing_env_variable_fails_at_load():
    with pytest.raises(ConfigError, match=r"uses \$\{NOT_SET_ANYWHERE\} but NOT_SET_ANYWHERE is not set"):
        load_config(None, [f"{k}={v}" for k, v in PPO.items()] + [
            "reward_model=http://127.0.0.1:1/score", "reward_api.headers.Authorization=Bearer ${NOT_SET_ANYWHERE}"])


# -- templates by LLaMA-Factory name -------------------------------------------------------


def test_llamafactory_template_names(tiny_model_dir, caplog):
    tok = load_tokenizer(str(tiny_model_dir))
    assert get_template("yi") is TEMPLATES["chatml"] and get_template("llama3") is TEMPLATES["llama3"]
    with caplog.at_level(logging.INFO, logger="alignkit.data.templates"):
        assert isinstance(get_template("mistral", tok), AutoTemplate)
    assert "tokenizer's own chat_template" in caplog.text
    with pytest.raises(ValueError, match=r"unknown template 'llama9'.*glm4.*llama2.*qwen3"):
        get_template("llama9")


# -- what full-text presets send -----------------------------------------------------------


def templated(tok, prompt: str, response_ids: list[int]) -> ScoreMeta:
    """ScoreMeta as the PPO loop builds it: the encoded prompt and the response ids, decoded."""
    query = encode_prompt(ChatFormat(tok, TEMPLATES["chatml"], SYSTEM), Example(messages=[{"role": "user", "content": prompt}]),
                          256)
    full = RewardService.full_texts(tok, [query, response_ids])
    return ScoreMeta(labels=["4"], templated_prompts=[full[0]], full_responses=[full[1]])


EXPECTED_PROMPT = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("preset", ["llamafactory", "openrlhf"])
def test_full_text_presets_send_template_system_prompt_and_special_tokens(tiny_model_dir, preset):
    tok = load_tokenizer(str(tiny_model_dir))
    response_ids = tok.encode("good", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    meta = templated(tok, "Say hi.", response_ids)
    with start_judge_server() as judge:
        reward = build_api_reward(parse_reward_api({"url": judge.url_for(preset), "preset": preset}))
        scores = asyncio.run(reward.score(["Say hi."], ["good"], meta))
        pairs = judge.stats.snapshot(pairs=True)["pairs"]
    assert scores[0].value == 1.0
    if preset == "llamafactory":  # {"model", "messages": [prompt + response]}: the server sees it as one text
        assert [(p["prompt"], p["response"]) for p in pairs] == [("", EXPECTED_PROMPT + "good<|im_end|>")]
    else:  # {"query": [prompt + response], "prompts": [prompt]}: the server splits query at the prompt
        assert [(p["prompt"], p["response"]) for p in pairs] == [(EXPECTED_PROMPT, "good<|im_end|>")]


def sentencepiece_tokenizer():
    """A real SentencePiece-style tokenizer (``tokenizers``' SentencePieceBPETokenizer: Metaspace
    pre-tokenizer and decoder, as Llama-2 and Mistral have) trained on shipped text, with Llama-2's
    chat markers as special tokens. Its decoder drops the space of a sequence's first word."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    rows = json.loads((EXAMPLES / "data" / "sft_demo.json").read_text())
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([r["instruction"] + " " + r["output"] for r in rows], vocab_size=300, min_frequency=1,
                           special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["[INST]", "[/INST]"])


@pytest.mark.parametrize("preset", ["llamafactory", "openrlhf"])
def test_full_text_presets_send_one_joint_decode_on_a_sentencepiece_tokenizer(preset):
    tok = sentencepiece_tokenizer()
    query = [tok.bos_token_id] + tok.encode("[INST] Say something good. [/INST]", add_special_tokens=False)
    response = tok.encode("It is good", add_special_tokens=False) + [tok.eos_token_id]
    joint = tok.decode(query + response, skip_special_tokens=False)
    assert joint.endswith("[/INST] It is good</s>")
    # Decoded apart, the response loses the space after [/INST]: the bug this guards against.
    assert tok.decode(query) + tok.decode(response) != joint
    prompt_text = RewardService.full_texts(tok, [query])[0]
    meta = ScoreMeta(labels=["4"], templated_prompts=[prompt_text],
                     full_responses=RewardService.joint_responses(tok, [query], [response]))
    assert meta.templated_prompts[0] + meta.full_responses[0] == joint
    with start_judge_server() as judge:
        reward = build_api_reward(parse_reward_api({"url": judge.url_for(preset), "preset": preset}))
        asyncio.run(reward.score(["Say something good."], ["It is good"], meta))
        pairs = judge.stats.snapshot(pairs=True)["pairs"]
    sent = [p["prompt"] + p["response"] for p in pairs]
    assert sent == [joint]


@pytest.mark.parametrize("preset", ["llamafactory", "openrlhf"])
def test_start_up_probe_is_templated_for_full_text_presets(tiny_model_dir, preset):
    with start_judge_server() as judge:
        spec = RewardSpec(reward_model_type="api", reward_api={"url": judge.url_for(preset), "preset": preset})
        context = RewardContext(base_model=str(tiny_model_dir), template="chatml", default_system=SYSTEM)
        service = build_reward_service(spec, context)
        try:
            service.start()
        finally:
            service.close()
        pairs = judge.stats.snapshot(pairs=True)["pairs"]
    probe_prompt = EXPECTED_PROMPT.replace("Say hi.", "What is 2 + 2?")
    assert [p["prompt"] + p["response"] for p in pairs] == [probe_prompt + "4<|im_end|>"]


def test_openai_judge_reads_a_fraction_as_its_numerator():
    cfg = parse_reward_api({"url": "http://127.0.0.1:9/v1/chat/completions", "preset": "openai_judge", "model": "m"})
    reply = {"choices": [{"message": {"content": "Clear and correct. Score: 3/10"}}]}
    assert make_preset(cfg).parse(reply, 1)[0] == [3.0]


def test_start_up_probe_retries_and_keeps_its_counters_out_of_step_one():
    with start_judge_server(fault_first=1, fault_kinds=("500",)) as judge:
        cfg = parse_reward_api({"url": judge.url_for("openrlhf"), "preset": "openrlhf", "backoff": 0.01})
        reward = build_api_reward(cfg)
        assert asyncio.run(reward.health_check()).ok  # the first reply was a 500, the retry passed
        assert judge.stats.snapshot()["requests"] == 2
    assert not any(k.startswith("reward/extra/") for k in reward.metrics())
    assert reward.metrics()["reward/requests"] == 0


# -- think tags as special tokens ----------------------------------------------------------


def plain_think_tokenizer(tiny_model_dir, tmp_path):
    """The tiny tokenizer with <think>/</think> as ordinary added tokens (Qwen3's kind)."""
    tok_dir = tmp_path / "plain_think"
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tok_dir)
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        t["special"] = t["special"] and "think" not in t["content"]
    (tok_dir / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    for t in config.get("added_tokens_decoder", {}).values():
        t["special"] = t["special"] and "think" not in t["content"]
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(tok_dir))


@pytest.mark.parametrize("kind", ["special", "plain"])
def test_strip_think_sees_the_tags_whatever_the_tokenizer(tiny_model_dir, tmp_path, kind):
    tok = load_tokenizer(str(tiny_model_dir)) if kind == "special" else plain_think_tokenizer(tiny_model_dir, tmp_path)
    assert ("<think>" in tok.all_special_tokens or tok.convert_tokens_to_ids("<think>") in
            {i for i, t in tok.added_tokens_decoder.items() if t.special}) == (kind == "special")
    eot = [tok.convert_tokens_to_ids("<|im_end|>")]
    rows = [tok.encode("<think>good good</think>good", add_special_tokens=False) + eot,
            tok.encode("<think>good good good", add_special_tokens=False)]  # cut off inside the thought
    service = build_reward_service(RewardSpec(reward_model="count_good", strip_think=True), RewardContext())
    try:
        texts = service.response_texts(tok, rows)
        assert texts[0] == "<think>good good</think>good" and texts[1].startswith("<think>")
        batch = service.collect([service.submit(["p", "p"], texts, ScoreMeta())])
    finally:
        service.close()
    assert batch.values == [1.0, 0.0]  # the answer only; the truncated thought gets think_truncated_score
    assert batch.metrics["rollout/think_truncated_frac"] == 0.5


# -- errors: one paragraph, no traceback ---------------------------------------------------


def run_cli(capsys, *argv: str) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" not in err
    # Progress bars and log lines may come around it; the error is one line, then the hint.
    lines = err.split("alignkit: error: ", 1)[1].splitlines()
    assert lines[1] == "(run with --debug or ALIGNKIT_DEBUG=1 for the traceback)"
    return lines[0]


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_config_error_is_one_paragraph_and_debug_shows_the_traceback(tmp_path, capsys):
    p = write_yaml(tmp_path / "ppo.yaml", {**PPO, "reward_model": "count_good", "use_unsloth": True})
    assert "'use_unsloth' is not supported" in run_cli(capsys, "train", p)
    with pytest.raises(ConfigError):
        main(["--debug", "train", p])


def test_missing_env_error_is_one_paragraph(tmp_path, capsys):
    p = write_yaml(tmp_path / "ppo.yaml", {**PPO, "reward_model": "http://127.0.0.1:1/score",
                                           "reward_api": {"headers": {"Authorization": "Bearer ${NOT_SET_X}"}}})
    assert "NOT_SET_X is not set in the environment" in run_cli(capsys, "train", p)


def test_data_error_is_one_paragraph_before_any_model(tiny_model_dir, tmp_path, capsys):
    p = write_yaml(tmp_path / "sft.yaml", {"stage": "sft", "model_name_or_path": str(tiny_model_dir),
                                           "dataset": str(tmp_path / "missing.jsonl"),
                                           "output_dir": str(tmp_path / "out")})
    assert "missing.jsonl" in run_cli(capsys, "train", p)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_names_both_ways_out(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("x")
    p = write_yaml(tmp_path / "sft.yaml", {"stage": "sft", "model_name_or_path": str(tiny_model_dir),
                                           "dataset": "sft_demo", "dataset_dir": str(EXAMPLES / "data"),
                                           "template": "chatml", "output_dir": str(tmp_path / "out")})
    message = run_cli(capsys, "train", p)
    assert "resume_from_checkpoint=true" in message and "overwrite_output_dir=true" in message


# -- end to end: LLaMA-Factory YAML files as its examples write them -----------------------

LF_TRAIN = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: {stage}
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
{method}
### dataset
dataset: {dataset}
dataset_dir: {data}
template: qwen
cutoff_len: 128
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
num_train_epochs: 3.0
max_steps: 2
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false  # LLaMA-Factory's examples say true; off here for a CPU
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

PPO_METHOD = """reward_model: {reward}
{reward_type}
### generate
max_new_tokens: 8
top_k: 0
top_p: 0.9
"""


def lf_train(tmp_path: Path, model: Path, stage: str, dataset: str, method: str = "") -> Path:
    out = tmp_path / f"lf_{stage}"
    p = tmp_path / f"lf_{stage}.yaml"
    p.write_text(LF_TRAIN.format(model=model, stage=stage, method=method, dataset=dataset, data=EXAMPLES / "data",
                                 out=out))
    assert main(["train", str(p)]) == 0
    return out


@pytest.mark.slow
def test_llamafactory_yamls_sft_rm_ppo_export(tiny_model_dir, tmp_path):
    sft = lf_train(tmp_path, tiny_model_dir, "sft", "sft_demo")
    rm = lf_train(tmp_path, tiny_model_dir, "rm", "prefs_demo")
    # reward_model names the RM adapter and no type: LLaMA-Factory's default (lora) is inferred.
    ppo = lf_train(tmp_path, tiny_model_dir, "ppo", "prompts_demo",
                   PPO_METHOD.format(reward=rm, reward_type=""))
    assert yaml.safe_load((ppo / "alignkit_config.yaml").read_text())["reward_model_type"] == "lora"
    export = tmp_path / "lf_export.yaml"
    export.write_text(f"""\
### model
model_name_or_path: {tiny_model_dir}
adapter_name_or_path: {sft}
template: qwen
finetuning_type: lora
trust_remote_code: true

### export
export_dir: {tmp_path / "merged"}
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
""")
    assert main(["export", str(export)]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_llamafactory_ppo_with_an_api_reward_sends_the_templated_text(tiny_model_dir, tmp_path):
    with start_judge_server() as judge:
        method = PPO_METHOD.format(reward=judge.url_for("llamafactory"), reward_type="reward_model_type: api")
        lf_train(tmp_path, tiny_model_dir, "ppo", "prompts_demo", method)
        pairs = judge.stats.snapshot(pairs=True)["pairs"]
    texts = [p["response"] for p in pairs]
    assert len(texts) >= 4  # the probe and two steps of two prompts
    system = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    sampled = [t for t in texts if t.startswith(system + "<|im_start|>user\n")]
    assert len(sampled) == len(texts)  # all are full templated texts, the start-up probe too (issue 25)
    assert sum("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>" in t for t in sampled) == 1
    assert all("<|im_start|>assistant\n" in t for t in sampled)


@pytest.mark.slow
def test_llamafactory_yaml_with_unsupported_keys_names_them_all(tiny_model_dir, tmp_path, capsys):
    p = tmp_path / "lf_qlora.yaml"
    p.write_text(LF_TRAIN.format(model=tiny_model_dir, stage="sft", dataset="sft_demo", data=EXAMPLES / "data",
                                 out=tmp_path / "out", method="quantization_bit: 4\nuse_dora: true\n"
                                 "deepspeed: examples/deepspeed/ds_z3_config.json\n"))
    message = run_cli(capsys, "train", str(p))
    assert all(f"'{k}' is not supported" in message for k in ("quantization_bit", "use_dora", "deepspeed"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unreachable", "non_numeric", "failure_rate"])
def test_reward_errors_at_start_up_and_mid_run_are_one_paragraph(tiny_model_dir, tmp_path, capsys, case):
    with start_judge_server(fault_rate=1.0 if case == "failure_rate" else 0.0, fault_kinds=("500",)) as judge:
        url = judge.url_for("alignkit")
        api = {"max_retries": 0, "health_check": case != "failure_rate"}
        if case == "non_numeric":  # the reply's "message" ("ok") read as the score
            url = judge.url_for("custom")
            api.update(preset="custom", response_path="message",
                       payload={"inputParams": {"query": "{prompt}", "model_answer": "{response}"}})
        if case == "unreachable":
            judge.stop()
        p = write_yaml(tmp_path / "ppo.yaml", {
            "stage": "ppo", "model_name_or_path": str(tiny_model_dir), "dataset": "prompts_demo",
            "dataset_dir": str(EXAMPLES / "data"), "template": "chatml", "output_dir": str(tmp_path / "out"),
            "reward_model": url, "reward_api": api, "per_device_train_batch_size": 2, "max_new_tokens": 4,
            "max_steps": 1, "report_to": "none"})
        message = run_cli(capsys, "train", p)
    expected = {"unreachable": "start-up check failed: connection error", "non_numeric": "non-numeric score",
                "failure_rate": "above max_failure_rate=0.5"}[case]
    assert expected in message

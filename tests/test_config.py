import logging

import pytest
import yaml

from alignkit.config import REDACTED, ConfigError, load_config, parse_override, save_config
from tests.conftest import EXAMPLES as EXAMPLES_DIR

BASE = ["stage=sft", "model_name_or_path=/m", "dataset=a", "output_dir=/o"]


def test_overrides_are_typed_like_yaml():
    assert parse_override("learning_rate=1e-4") == ("learning_rate", 1e-4)
    assert parse_override("bf16=true") == ("bf16", True)
    assert parse_override("lora_rank=16") == ("lora_rank", 16)
    cfg = load_config(None, BASE + ["learning_rate=1e-4", "lora_target=q_proj,v_proj", "dataset=x,y"])
    assert cfg.learning_rate == 1e-4
    assert cfg.lora_target == ["q_proj", "v_proj"]
    assert cfg.dataset == ["x", "y"]


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "sft.yaml"
    p.write_text(yaml.safe_dump({"stage": "sft", "model_name_or_path": "/m", "dataset": "a", "output_dir": "/o",
                                 "lora_rank": 4, "evaluation_strategy": "no", "system_prompt": "Be brief."}))
    cfg = load_config(p, ["lora_rank=32"])
    assert cfg.lora_rank == 32 and cfg.alpha == 64
    assert cfg.default_system == "Be brief."  # alias


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate'; did you mean 'learning_rate'"):
        load_config(None, BASE + ["lerning_rate=1"])


def test_ignored_llamafactory_key_warns(caplog):
    with caplog.at_level(logging.WARNING):
        load_config(None, BASE + ["overwrite_cache=true", "preprocessing_num_workers=16"])
    assert "overwrite_cache" in caplog.text and "preprocessing_num_workers" in caplog.text


def test_unsupported_key_is_an_error():
    with pytest.raises(ConfigError, match="quantization_bit.*not supported"):
        load_config(None, BASE + ["quantization_bit=4"])


def test_type_error_names_key_and_type():
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size.*integer.*'abc'"):
        load_config(None, BASE + ["per_device_train_batch_size=abc"])
    with pytest.raises(ConfigError, match=r"finetuning_type"):
        load_config(None, BASE + ["finetuning_type=freeze"])


def test_stage_required_and_checked():
    with pytest.raises(ConfigError, match="stage"):
        load_config(None, ["model_name_or_path=/m"])


def test_secrets_redacted_in_saved_config(tmp_path):
    cfg = load_config(None, ["stage=ppo", "model_name_or_path=/m", "dataset=a", "output_dir=/o",
                             "reward_model_type=api", "reward_model=http://127.0.0.1:1/score",
                             "reward_api.headers.Authorization=Bearer sk-very-secret",
                             "reward_api.headers.X-Api-Key=sk-other-secret"])
    path = save_config(cfg, tmp_path)
    text = path.read_text()
    assert "sk-very-secret" not in text and "sk-other-secret" not in text
    assert REDACTED in text
    assert yaml.safe_load(text)["reward_model"] == "http://127.0.0.1:1/score"


def test_dotted_override_merges_into_yaml_mapping(tmp_path):
    p = tmp_path / "ppo.yaml"
    p.write_text(yaml.safe_dump({"stage": "ppo", "model_name_or_path": "/m", "dataset": "a", "output_dir": "/o",
                                 "reward_model_type": "api", "reward_model": "http://127.0.0.1:1/score",
                                 "reward_api": {"preset": "openrlhf", "timeout_s": 5}}))
    cfg = load_config(p, ["reward_api.max_concurrency=64"])
    assert cfg.reward_api.model_dump(include={"preset", "timeout_s", "max_concurrency"}) == {
        "preset": "openrlhf", "timeout_s": 5, "max_concurrency": 64}


PPO_JUDGE = ["stage=ppo", "model_name_or_path=/m", "dataset=a", "output_dir=/o", "reward_model_type=api",
             "reward_model=http://127.0.0.1:1/score"]


def test_misspelled_reward_api_key_fails_at_load_before_any_model(tmp_path, capsys):
    from alignkit.cli import main

    p = tmp_path / "ppo.yaml"
    out = tmp_path / "run"
    p.write_text(yaml.safe_dump({"stage": "ppo", "model_name_or_path": str(tmp_path / "no_model_here"),
                                 "dataset": "a", "output_dir": str(out), "reward_model_type": "api",
                                 "reward_model": "http://127.0.0.1:1/score",
                                 "reward_api": {"preset": "openrlhf", "max_concurency": 8}}))
    expected = r"unknown key 'reward_api.max_concurency'; did you mean 'max_concurrency'\?"
    with pytest.raises(ConfigError, match=rf"ppo.yaml: {expected}"):
        load_config(p)
    # `alignkit train` stops there: the (missing) model is never looked at, nothing is written.
    assert main(["train", str(p)]) == 1
    assert "did you mean 'max_concurrency'?" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["reward_api.preset=openai_judge"], r"key 'reward_api.model' is required"),
        (["reward_api.preset=openai_judge", "reward_api.model=j", "reward_api.rubrik=x"],
         r"unknown key 'reward_api.rubrik'; did you mean 'rubric'\?"),
        (["reward_api.strip_thinking=true"], r"unknown key 'reward_api.strip_thinking'; did you mean 'strip_think'\?"),
        (["reward_api.preset=vllm"], r"reward_api.preset must be one of alignkit, llamafactory"),
        (["reward_api.url=judge:8000/score"], r"reward_api.url must be an http\(s\) URL"),
        (["reward_model=judge:8000/score"], r"reward_model must be an http\(s\) URL"),
        (["reward_api.on_failure=zero", "on_failure=fail"], r"reward_api.on_failure='zero' and on_failure='fail' disagree"),
    ],
)
def test_reward_spec_errors_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, PPO_JUDGE + overrides)


def test_reward_keys_once_and_old_spellings_under_reward_api():
    cfg = load_config(None, PPO_JUDGE + ["reward_api.on_failure=zero", "reward_api.max_failure_rate=0.9",
                                         "reward_api.strip_think=true", "reward_api.think_tags=[<t>, </t>]",
                                         "reward_api.cache=/tmp/c.sqlite", "reward_api.include_special_tokens=true",
                                         "max_failure_rate=0.9"])  # the same value twice is no conflict
    assert (cfg.on_failure, cfg.max_failure_rate, cfg.strip_think, cfg.think_tags) == ("zero", 0.9, True, ("<t>", "</t>"))
    assert cfg.reward_cache == "/tmp/c.sqlite" and cfg.include_special_tokens
    assert cfg.api_settings().url == "http://127.0.0.1:1/score"
    rule = load_config(None, BASE[1:] + ["stage=ppo", "reward_model=count_good", "on_failure=fail"])
    assert rule.on_failure == "fail" and rule.reward_api is None


def test_saved_ppo_config_loads_again(tmp_path):
    cfg = load_config(None, PPO_JUDGE + ["reward_api.preset=custom", "reward_api.payload.q={response}",
                                         "reward_api.strip_think=true"])
    again = load_config(save_config(cfg, tmp_path))
    assert again.reward_api == cfg.reward_api and again.strip_think


def test_keys_command_lists_every_ppo_key(capsys):
    from alignkit.cli import main

    assert main(["keys", "ppo"]) == 0
    out = capsys.readouterr().out
    for key in ("ppo_epochs", "reward_api", "init_kl_coef", "lora_target", "kl_penalty"):
        assert f"\n{key}: " in out or out.startswith(f"{key}: ")
    assert "Literal['kl', 'abs', 'mse', 'full']" in out


# -- every problem of a config in one report, before any model loads ------------------------


def test_every_problem_at_once_and_overrides_blamed_on_the_override(tmp_path, capsys):
    from alignkit.cli import main

    p = tmp_path / "sft.yaml"
    out = tmp_path / "run"
    p.write_text(yaml.safe_dump({
        "stage": "sft", "model_name_or_path": str(tmp_path / "no_model_here"), "dataset": "nowhere_data",
        "dataset_dir": str(tmp_path), "output_dir": str(out), "template": "qwen3_nothnk",
        "optim": "adamw_bnb_8bit", "lerning_rate": 1e-4}))
    with pytest.raises(ConfigError) as err:
        load_config(p, ["lora_rank=0"])
    message = str(err.value)
    file_part, cli_part = message.split("command-line override 'lora_rank=0': ")
    assert file_part.startswith(f"{p}: ")
    for expected in ("unknown key 'lerning_rate'; did you mean 'learning_rate'?",
                     "key 'optim': Input should be", "(8-bit and paged optimizers need bitsandbytes",
                     "unknown template 'qwen3_nothnk'; did you mean 'qwen3_nothink'",
                     "dataset 'nowhere_data' is neither registered",
                     "'model_name_or_path'", "no config.json there"):
        assert expected in file_part, expected
    assert "lora_rank" not in file_part and "key 'lora_rank'" in cli_part and "greater than or equal to 1" in cli_part
    assert "\n" not in message
    # `alignkit train` reports the same at once, writes nothing and loads nothing.
    assert main(["train", str(p)]) == 1
    err_text = capsys.readouterr().err
    assert "did you mean 'qwen3_nothink'" in err_text and "neither registered" in err_text
    assert not out.exists()


def test_train_checks_paths_even_when_the_keys_are_right(tmp_path, capsys):
    from alignkit.cli import main

    assert main(["train", str(EXAMPLES_DIR / "sft_tiny.yaml"), f"model_name_or_path={tmp_path / 'none'}",
                 "dataset=not_a_dataset", f"output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "command-line override 'model_name_or_path=" in err and "no config.json there" in err
    assert "command-line override 'dataset=not_a_dataset'" in err and not (tmp_path / "run").exists()


def test_stage_pt_names_the_real_stages():
    with pytest.raises(ConfigError, match=r"'pt' \(LLaMA-Factory's pre-training on raw text\) is not a stage here; "
                                          r"the stages are dpo, kto, ppo, rm, sft"):
        load_config(None, ["stage=pt", "model_name_or_path=/m", "dataset=a", "output_dir=/o"])

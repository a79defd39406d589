import logging

import pytest
import yaml

from alignkit.config import REDACTED, ConfigError, load_config, parse_override, save_config

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
                             "reward_api.api_key=sk-other-secret"])
    path = save_config(cfg, tmp_path)
    text = path.read_text()
    assert "sk-very-secret" not in text and "sk-other-secret" not in text
    assert REDACTED in text
    assert yaml.safe_load(text)["reward_model"] == "http://127.0.0.1:1/score"


def test_dotted_override_merges_into_yaml_mapping(tmp_path):
    p = tmp_path / "ppo.yaml"
    p.write_text(yaml.safe_dump({"stage": "ppo", "model_name_or_path": "/m", "dataset": "a", "output_dir": "/o",
                                 "reward_model_type": "api", "reward_model": "http://127.0.0.1:1/score",
                                 "reward_api": {"preset": "custom", "timeout_s": 5}}))
    cfg = load_config(p, ["reward_api.max_concurrency=64"])
    assert cfg.reward_api == {"preset": "custom", "timeout_s": 5, "max_concurrency": 64}


def test_keys_command_lists_every_ppo_key(capsys):
    from alignkit.cli import main

    assert main(["keys", "ppo"]) == 0
    out = capsys.readouterr().out
    for key in ("ppo_epochs", "reward_api", "init_kl_coef", "lora_target", "kl_penalty"):
        assert f"\n{key}: " in out or out.startswith(f"{key}: ")
    assert "Literal['kl', 'abs', 'mse', 'full']" in out

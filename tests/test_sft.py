"""SFT on the tiny real model: it learns, saves, reloads, and resumes exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.train import sft
from alignkit.train.checkpoint import list_checkpoints, load_state, prune, write_checkpoint
from alignkit.train.tracking import read_metrics
from tests.conftest import crash_after_first_checkpoint

MEMO = [
    {"instruction": "Say the code word.", "input": "", "output": "The code word is good."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "What is two plus two?", "input": "", "output": "Four."},
    {"instruction": "How are you?", "input": "", "output": "I am good, thank you."},
]


@pytest.fixture
def memo_data(tmp_path):
    path = tmp_path / "memo.json"
    path.write_text(json.dumps(MEMO * 4))
    return path


def sft_config(model_dir, data, out, **kw):
    args = dict(stage="sft", model_name_or_path=str(model_dir), dataset=str(data), template="chatml",
                output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=30,
                logging_steps=1, save_steps=100, lora_rank=8, lora_target="all", report_to="tensorboard", seed=3)
    args.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in args.items()])


def test_sft_loss_drops_and_adapter_reloads(tiny_model_dir, memo_data, tmp_path):
    out = sft.run(sft_config(tiny_model_dir, memo_data, tmp_path / "run", plot_loss="true", learning_rate=5e-3,
                             max_steps=60, lr_scheduler_type="constant"))
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_train_loss.png").is_file()
    assert list((out / "runs").glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert "sk-" not in (out / "alignkit_config.yaml").read_text()

    # Reload like a user: base + adapter from disk gives the same logits as the saved weights imply.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, out).eval()
    after = model(ids).logits
    assert not torch.allclose(before, after), "adapter had no effect"
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()(ids).logits
    torch.testing.assert_close(after, again)


def test_resume_matches_uninterrupted_run(tiny_model_dir, memo_data, tmp_path, monkeypatch):
    kw = dict(max_steps=6, save_steps=3, learning_rate=1e-3)
    full = sft.run(sft_config(tiny_model_dir, memo_data, tmp_path / "full", **kw))

    crash_after_first_checkpoint(lambda: sft.run(sft_config(tiny_model_dir, memo_data, tmp_path / "cut", **kw)), monkeypatch)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-3"]

    resumed = sft.run(sft_config(tiny_model_dir, memo_data, tmp_path / "cut", resume_from_checkpoint="true", **kw))
    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in read_metrics(resumed) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log reads as one run


def test_epoch_logged_is_the_one_reached_after_the_step(tiny_model_dir, tmp_path):
    """18 rows in global batches of 4: an epoch is 4 steps (the last 2 rows are dropped), so a run of
    2 epochs logs 0.25 after its first step and exactly 2.0 after its last."""
    data = tmp_path / "memo18.json"
    data.write_text(json.dumps((MEMO * 5)[:18]))
    out = sft.run(sft_config(tiny_model_dir, data, tmp_path / "run", max_steps=-1, num_train_epochs=2,
                             report_to="none"))
    epochs = [r["train/epoch"] for r in read_metrics(out) if "train/epoch" in r]
    assert epochs == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]

def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 1, lambda d: (d / "w.bin").write_text("one"), {"x": 1})

    def broken(d):
        (d / "w.bin").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_checkpoint(tmp_path, 2, broken, {"x": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert (tmp_path / "checkpoint-1" / "w.bin").read_text() == "one"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")]


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 10):
        write_checkpoint(tmp_path, step, lambda d: None, {}, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]  # by step, not by name
    assert not (tmp_path / "checkpoint-1").exists()
    prune(tmp_path, None)  # no limit: everything stays
    assert len(list_checkpoints(tmp_path)) == 2
    assert load_state(tmp_path / "checkpoint-10")["step"] == 10


def test_full_finetune_and_cli(tiny_model_dir, memo_data, tmp_path):
    out = tmp_path / "full"
    rc = main(["train", str(_write_yaml(tmp_path, tiny_model_dir, memo_data, out)),
               "finetuning_type=full", "max_steps=3", "learning_rate=1e-4"])
    assert rc == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.architectures == ["Qwen2ForCausalLM"]


def test_llamafactory_yaml_names_unsupported_keys(tiny_model_dir, memo_data, tmp_path, capsys):
    lf = {
        "model_name_or_path": str(tiny_model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "dataset": str(memo_data), "template": "qwen", "cutoff_len": 2048,
        "max_samples": 1000, "overwrite_cache": True, "preprocessing_num_workers": 16,
        "output_dir": str(tmp_path / "lf"), "logging_steps": 10, "save_steps": 500, "plot_loss": True,
        "overwrite_output_dir": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
        "learning_rate": 1.0e-4, "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
        "bf16": False, "ddp_timeout": 180000000, "quantization_bit": 4,
    }
    import yaml

    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(lf))
    assert main(["train", str(path)]) == 1
    assert "quantization_bit" in capsys.readouterr().err


def _write_yaml(tmp_path, model_dir, data, out):
    import yaml

    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"stage": "sft", "model_name_or_path": str(model_dir), "dataset": str(data),
                                    "template": "chatml", "output_dir": str(out), "per_device_train_batch_size": 4}))
    return path


def test_bf16_with_gradient_checkpointing_trains(tiny_model_dir, memo_data, tmp_path):
    out = sft.run(sft_config(tiny_model_dir, memo_data, tmp_path / "bf16", bf16="true",
                             gradient_checkpointing="true", max_steps=3, report_to="none"))
    rows = read_metrics(out)
    assert len(rows) == 3 and all(r["train/loss"] == r["train/loss"] for r in rows)  # finite, not NaN
    # LoRA weights are kept in float32 on a bf16 base, for stable optimizer updates.
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "adapter_model.safetensors")).values())


def test_preflight_names_the_key_and_path_before_anything_loads(tiny_model_dir, memo_data, tmp_path, capsys,
                                                                monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(sft, "build_policy_model", no_model)
    out = tmp_path / "run"
    yaml_path = _write_yaml(tmp_path, tiny_model_dir, memo_data, out)
    missing = tmp_path / "no_such_model"
    assert main(["train", str(yaml_path), f"model_name_or_path={missing}"]) == 1
    err = capsys.readouterr().err
    assert "model_name_or_path" in err and str(missing) in err
    assert not out.exists(), "a failed check must not leave a config behind in output_dir"

    assert main(["train", str(yaml_path), f"adapter_name_or_path={tiny_model_dir}"]) == 1
    assert "adapter_name_or_path" in (err := capsys.readouterr().err) and "adapter_config.json" in err

    (tmp_path / "a_file").write_text("")
    assert main(["train", str(yaml_path), f"output_dir={tmp_path / 'a_file' / 'run'}"]) == 1
    assert "output_dir" in capsys.readouterr().err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([*MEMO, {"instruction": "No answer."}]))
    assert main(["train", str(yaml_path), f"dataset={bad}"]) == 1
    assert str(bad) in capsys.readouterr().err and not out.exists()


def test_llamafactory_log_files_beside_alignkits(tiny_model_dir, memo_data, tmp_path):
    """trainer_log.jsonl (LLaMA-Factory's LogCallback format), trainer_state.json (the Trainer's
    log_history) and all_results.json, which LlamaBoard and users' scripts read."""
    out = sft.run(sft_config(tiny_model_dir, memo_data, tmp_path / "run", max_steps=4, logging_steps=2,
                             report_to="none"))
    ours = [r for r in read_metrics(out) if "train/loss" in r]
    lines = [json.loads(ln) for ln in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [ln["current_steps"] for ln in lines] == [2, 4] and {ln["total_steps"] for ln in lines} == {4}
    assert [ln["percentage"] for ln in lines] == [50.0, 100.0]
    assert [ln["loss"] for ln in lines] == [r["train/loss"] for r in ours]
    assert [ln["lr"] for ln in lines] == [r["train/learning_rate"] for r in ours]
    assert all(re.fullmatch(r"\d+:\d\d:\d\d", ln["elapsed_time"]) and re.fullmatch(r"\d+:\d\d:\d\d", ln["remaining_time"])
               for ln in lines)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == 4
    assert [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h] == [(2, ours[0]["train/loss"]),
                                                                                     (4, ours[1]["train/loss"])]
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_loss"] == pytest.approx(sum(r["train/loss"] for r in ours) / 2)
    assert results["train_runtime"] > 0


def test_a_dataset_smaller_than_one_global_batch_says_why_and_what_fits(tiny_model_dir, memo_data, tmp_path):
    # 16 rows; 4 per device x 8 accumulation steps = 32 per step.
    with pytest.raises(ValueError) as err:
        sft.run(sft_config(tiny_model_dir, memo_data, tmp_path / "run", gradient_accumulation_steps=8))
    message = str(err.value)
    assert "16 training examples cannot fill one global batch of 32" in message
    assert "LLaMA-Factory would run one partial batch" in message
    assert "set gradient_accumulation_steps: 4" in message

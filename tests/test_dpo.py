"""DPO and KTO on the tiny real model: learning on held-out pairs, no reference pass for ORPO and
SimPO, the three reference sources agree, resume and export, LLaMA-Factory's DPO YAML, KTO on
kto_tag rows and on pairs, config errors, and the report's preference checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.data.loader import DataError, load_examples
from alignkit.report import write_report
from alignkit.report.data import Series
from alignkit.report.health import FAIL, OK, WARN, check_chosen_logps, check_pref_margins
from alignkit.train import dpo, kto
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES, crash_after_first_checkpoint
from tests.test_llamafactory import lf_train

# prefs_demo: the chosen answer contains the word "good", the rejected one does not; 10% is held out.
FAST = ["cutoff_len=64", "logging_steps=1", "report_to=none", "plot_loss=false"]
NO_EVAL = ["val_size=0", "eval_strategy=no", "per_device_train_batch_size=8"]


def stage_config(example: str, model_dir, out, *overrides: str):
    return load_config(EXAMPLES / example, [f"model_name_or_path={model_dir}", f"output_dir={out}",
                                            f"dataset_dir={EXAMPLES / 'data'}", *FAST, *overrides])


def eval_rows(out) -> list[dict]:
    return [r for r in read_metrics(out) if "eval/rewards/margins" in r]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_dpo_learns_held_out_pairs(tiny_model_dir, tmp_path, loss):
    out = dpo.run(stage_config("dpo_tiny.yaml", tiny_model_dir, tmp_path / loss, f"pref_loss={loss}", "max_steps=12",
                               "eval_steps=4"))
    first = read_metrics(out)[0]  # step 1's batch, scored before any update
    assert first["train/rewards/accuracies"] < 0.5  # with a reference the policy equals it: every reward is 0
    evals = eval_rows(out)
    margins = [r["eval/rewards/margins"] for r in evals]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert margins == sorted(margins) and margins[-1] > 0, margins
    final = json.loads((out / dpo.EVAL_FILE).read_text())
    assert final["eval/rewards/accuracies"] >= 0.9 and final["num_rows"] == 20
    assert final["eval/rewards/chosen"] > final["eval/rewards/rejected"]
    write_report(out)
    checks = {c["name"]: c["verdict"] for c in json.loads((out / "report" / "health.json").read_text())["checks"]}
    assert checks["pref_margins"] == OK and checks["chosen_logps"] in (OK, WARN), checks


@pytest.mark.parametrize("loss, finetuning", [("orpo", "full"), ("simpo", "lora")])
def test_reference_free_losses_run_no_reference_pass(tiny_model_dir, tmp_path, monkeypatch, loss, finetuning):
    def no_reference(*args, **kwargs):
        raise AssertionError(f"pref_loss {loss} needs no reference model")

    monkeypatch.setattr(dpo, "reference_logps", no_reference)
    monkeypatch.setattr(dpo, "load_base", no_reference)  # full fine-tuning would otherwise load a frozen copy
    out = dpo.run(stage_config("dpo_tiny.yaml", tiny_model_dir, tmp_path / loss, f"pref_loss={loss}",
                               f"finetuning_type={finetuning}", "max_steps=6", *NO_EVAL))
    rows = read_metrics(out)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert rows[-1]["train/rewards/margins"] > rows[0]["train/rewards/margins"]


def test_dpo_reads_sharegpt_pairs(tiny_model_dir, tmp_path):
    out = dpo.run(stage_config("dpo_tiny.yaml", tiny_model_dir, tmp_path / "sharegpt", "dataset=prefs_sharegpt",
                               "max_steps=2", *NO_EVAL))
    assert [r["step"] for r in read_metrics(out)] == [1, 2] and (out / "adapter_model.safetensors").is_file()


def test_reference_sources_agree(tiny_model_dir, tmp_path):
    """Adapter disabled per batch, precomputed once, and a separate ref_model copy of the same base
    give the same reference, so the same losses and rewards."""
    sources = {"disabled": [], "precomputed": ["precompute_ref_logprobs=true"], "ref_model": [f"ref_model={tiny_model_dir}"]}
    runs = {name: read_metrics(dpo.run(stage_config("dpo_tiny.yaml", tiny_model_dir, tmp_path / name, "max_steps=2",
                                                     *NO_EVAL, *extra)))
            for name, extra in sources.items()}
    keys = ["train/loss", "train/rewards/margins", "train/rewards/chosen", "train/logps/rejected"]
    for name in ("precomputed", "ref_model"):
        for a, b in zip(runs["disabled"], runs[name], strict=True):
            for k in keys:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (name, k)
    assert runs["disabled"][1]["train/rewards/margins"] != 0.0  # the second step's policy differs from its reference


def test_dpo_resume_reproduces_uninterrupted_run_and_exports(tiny_model_dir, tmp_path, monkeypatch):
    args = ["max_steps=4", "save_steps=2", *NO_EVAL]
    full = dpo.run(stage_config("dpo_tiny.yaml", tiny_model_dir, tmp_path / "full", *args))

    crash_after_first_checkpoint(lambda: dpo.run(stage_config("dpo_tiny.yaml", tiny_model_dir, tmp_path / "cut", *args)),
                                 monkeypatch)
    resumed = dpo.run(stage_config("dpo_tiny.yaml", tiny_model_dir, tmp_path / "cut", *args, "resume_from_checkpoint=true"))
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4)
    wa, wb = load_file(str(full / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)
    # The run exports like any other: merged into a plain model and verified against base + adapter.
    assert main(["export", "--from", str(resumed), "--export_dir", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "export_report.json").read_text())["passed"] is True


# The method block of LLaMA-Factory's examples/train_lora/llama3_lora_{dpo,kto}.yaml.
LF_METHODS = {"dpo": "pref_beta: 0.1\npref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]\n",
              "kto": "pref_beta: 0.1\n"}


@pytest.mark.slow
@pytest.mark.parametrize("stage, dataset", [("dpo", "prefs_demo"), ("kto", "kto_demo")])
def test_llamafactory_dpo_and_kto_yamls_run(tiny_model_dir, tmp_path, stage, dataset):
    """LLaMA-Factory's DPO and KTO example YAMLs, as its examples write them, paths changed."""
    out = lf_train(tmp_path, tiny_model_dir, stage, dataset, LF_METHODS[stage])
    assert (out / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(out) if "train/loss" in r] == [2]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["kto_demo", "prefs_demo"])
def test_kto_learns_on_tagged_rows_and_on_pairs(tiny_model_dir, tmp_path, dataset):
    out = kto.run(stage_config("kto_tiny.yaml", tiny_model_dir, tmp_path / dataset, f"dataset={dataset}",
                               "max_steps=12", "eval_steps=4"))
    evals = eval_rows(out)
    margins = [r["eval/rewards/margins"] for r in evals]
    assert margins[-1] > margins[0] > 0, margins
    assert evals[-1]["eval/rewards/chosen"] > 0 > evals[-1]["eval/rewards/rejected"]
    assert all(r["train/kl"] >= 0 for r in read_metrics(out) if "train/kl" in r)


def test_kto_rows_from_tags_and_from_pairs(tmp_path):
    tagged = load_examples("kto_demo", str(EXAMPLES / "data"), "kto")
    assert {ex.kto_tag for ex in tagged} == {True, False}
    (prompt, answer, desirable), = kto.unpaired(tagged[:1])
    assert prompt.messages[-1]["role"] == "user" and answer == tagged[0].messages[-1]["content"] and desirable
    pairs = load_examples("prefs_demo", str(EXAMPLES / "data"), "kto")[:3]
    rows = kto.unpaired(pairs)
    assert [d for _, _, d in rows] == [True, False] * 3 and rows[1][1] == pairs[0].rejected
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                "kto_tag": "yes"}]))
    with pytest.raises(DataError, match=r"bad.json: row 0: 'kto_tag' \(kto_tag\) must be true"):
        load_examples(str(bad), None, "kto")


@pytest.mark.parametrize("overrides, message", [
    (["pref_loss=ipo", "dpo_label_smoothing=0.1"], "dpo_label_smoothing applies to pref_loss: sigmoid, not ipo"),
    (["pref_loss=orpo", "ref_model=/somewhere"], "pref_loss: orpo uses no reference model; remove ref_model"),
    (["pref_loss=simpo", "precompute_ref_logprobs=true"], "remove precompute_ref_logprobs"),
    (["ref_model_adapters=/a,/b"], "ref_model_adapters needs ref_model"),
    (["pref_loss=dpo"], "pref_loss"),
    (["pref_los=ipo"], "did you mean 'pref_loss'"),
])
def test_dpo_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EXAMPLES / "dpo_tiny.yaml", overrides)


def test_kto_and_dpo_keys_load():
    cfg = load_config(EXAMPLES / "kto_tiny.yaml", ["kto_rejected_weight=1.3", "ref_model=/r", "ref_model_adapters=/a,/b"])
    assert (cfg.stage, cfg.kto_rejected_weight, cfg.ref_model_adapters) == ("kto", 1.3, ["/a", "/b"])
    assert load_config(EXAMPLES / "dpo_tiny.yaml", ["pref_loss=orpo"]).uses_reference is False


def series(*values: float) -> Series:
    return Series(list(range(1, len(values) + 1)), list(values))


def test_preference_health_checks():
    rising = {"train/rewards/margins": series(0, 0.2, 0.5, 0.9, 1.4, 2.0)}
    assert check_pref_margins(rising, {}).verdict == OK
    assert check_pref_margins({"train/rewards/margins": series(0, -0.1, -0.3, -0.2, -0.5, -0.6)}, {}).verdict == FAIL
    # The known DPO failure: the margin grows while the chosen answer's log-prob falls too.
    steady = {"train/logps/chosen": series(-40, -39, -41, -40, -38, -39)}
    falling = {"train/logps/chosen": series(-40, -42, -45, -48, -52, -55)}
    collapsed = {"train/logps/chosen": series(-40, -60, -80, -120, -150, -200)}
    assert check_chosen_logps(steady, {}).verdict == OK
    assert check_chosen_logps(falling, {}).verdict == WARN
    assert check_chosen_logps(collapsed, {}).verdict == FAIL

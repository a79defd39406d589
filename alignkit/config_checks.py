"""What ``load_config`` checks besides the keys' types: refused choices and why, the template name,
and the paths and datasets a run needs (checked without loading anything), and how every
problem of a config reads as one paragraph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Values LLaMA-Factory (or transformers) accepts that alignkit does not, and why: a bare list of
# allowed values leaves the user guessing whether theirs is a typo or a missing feature.
VALUE_REASONS: dict[str, dict[Any, str]] = {
    "optim": {
        **dict.fromkeys(("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit",
                         "paged_lion_8bit"), "8-bit and paged optimizers need bitsandbytes, which alignkit does not use"),
        **dict.fromkeys(("adafactor", "lion_32bit", "galore_adamw", "galore_adamw_8bit", "apollo_adamw", "lomo",
                         "adalomo", "muon"), "this optimizer is not implemented here"),
    },
    "lr_scheduler_type": dict.fromkeys(
        ("cosine_with_restarts", "polynomial", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
         "warmup_stable_decay"), "this schedule is not implemented here"),
    "finetuning_type": dict.fromkeys(("freeze", "oft"), "only LoRA adapters and full fine-tuning are implemented"),
}


def template_problems(name: Any) -> list[str]:
    """The template name, checked before any tokenizer loads (``auto`` is checked against it later)."""
    from alignkit.data.templates import known_template_names, unknown_template_message

    if isinstance(name, str) and name not in known_template_names():
        return [f"key 'template': {unknown_template_message(name)}"]
    return []


def path_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """What the run reads and writes, checked without loading anything: the model and adapter
    directories, the datasets (registered in dataset_info.json, files present) and output_dir."""
    from alignkit.data.loader import dataset_problems

    out: list[tuple[str, str]] = []
    model = raw.get("model_name_or_path")
    gguf_file = isinstance(model, str) and model.endswith(".gguf") and Path(model).is_file()  # converted at start
    if isinstance(model, str) and not gguf_file and not (Path(model) / "config.json").is_file():
        out.append(("model_name_or_path", f"key 'model_name_or_path': {model!r} is not a Hugging Face model "
                    "directory (no config.json there) nor a .gguf file"))
    adapters = raw.get("adapter_name_or_path") or []
    for adapter in adapters.split(",") if isinstance(adapters, str) else adapters:
        if isinstance(adapter, str) and not (Path(adapter.strip()) / "adapter_config.json").is_file():
            out.append(("adapter_name_or_path", f"key 'adapter_name_or_path': {adapter!r} is not a peft adapter "
                        "directory (no adapter_config.json there)"))
    dataset = raw.get("dataset")
    if isinstance(dataset, str | list) and dataset:
        out += [("dataset", f"key 'dataset': {p}") for p in dataset_problems(dataset, raw.get("dataset_dir", "data"))]
    if isinstance(raw.get("reward_api"), dict) and raw["reward_api"].get("criteria_column"):
        from alignkit.rewards.api.row_criteria import column_problems  # reads the rows' rubric cells

        out += column_problems(raw)
    output_dir = raw.get("output_dir")
    if isinstance(output_dir, str) and (problem := output_dir_problem(output_dir)):
        out.append(("output_dir", problem))
    return out


def output_dir_problem(output_dir: str) -> str | None:
    """output_dir, or the nearest existing folder above it (where it will be created), must be writable."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return (f"output_dir: {output_dir!r} cannot be written ({existing} is not a writable directory); "
                "choose another output_dir or fix its permissions.")
    return None


def describe_problems(problems: list[tuple[str | None, str]], where: str, from_cli: dict[str, str]) -> str:
    """One paragraph: the file's problems after its name, the overrides' after theirs."""
    in_file = [m for k, m in problems if k not in from_cli]
    parts = [f"{where}: " + "; ".join(in_file)] if in_file else []
    for item in dict.fromkeys(from_cli[k] for k, _ in problems if k in from_cli):
        parts.append(f"command-line override {item!r}: " + "; ".join(m for k, m in problems if from_cli.get(k) == item))
    return ". ".join(parts) + "."

"""``alignkit export``: merge adapters into the base, drop training-only heads, save, verify.

The output is a plain Hugging Face directory: safetensors shards (+ index), the tokenizer, a
jinja chat template matching the one the run trained with, and a generation config whose EOS
ids include the template's end-of-turn token. PPO's value head never enters the weights (only
the policy adapter is merged); it is copied to ``extras/`` for anyone who continues PPO.

Verification (on by default) reloads the export with plain ``AutoModelForCausalLM`` and checks
it against the unmerged base + adapters (see ``verify_export``); the verdict goes to
``export_report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alignkit.config import ConfigError, _explain, _normalise_keys, read_raw
from alignkit.data.templates import EMPTY_THINK, TEMPLATES, Template, get_template
from alignkit.models.loading import check_model_dir, merge_adapters

logger = logging.getLogger(__name__)

RUN_CONFIG = "alignkit_config.yaml"
REPORT_FILE = "export_report.json"
EXTRAS_DIR = "extras"
# Training-only files a run directory may hold next to its policy adapter.
EXTRA_FILES = ("value_head.safetensors",)
EXTRA_DIRS = ("critic_adapter",)
# Substrings no exported weight name may contain: heads and wrapper prefixes of training.
FORBIDDEN_KEY_PARTS = ("v_head", "summary", "score", "pretrained_model.", "base_model.model.", "lora_")
# A sequence classifier keeps its ``score`` head but has no LM head.
RM_FORBIDDEN_KEY_PARTS = ("v_head", "summary", "pretrained_model.", "base_model.model.", "lora_", "lm_head")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Logit tolerance per dtype, relative to the reference logits' scale: max|diff| <= tol * max(1, max|logit|).
# fp32 differs only by summation order; half precision rounds the merged weights once more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
VERIFY_PROMPTS = ("Hello! Who are you?", "Write one sentence about the sea.", "What is 2 + 3?")


# ---------------------------------------------------------------- small YAML configs


def load_tool_config(
    cls: type[BaseModel], path: str | Path | None, overrides: list[str] | None = None, **extra: Any
) -> Any:
    """A non-training config (export, predict, compare): YAML + ``key=value`` overrides + ``extra``,
    validated with the same unknown-key suggestions and error wording as the stage configs."""
    where = str(path) if path else "command line"
    raw = read_raw(path, overrides)
    # Command-line flags (``extra``) win over the file and its overrides here.
    raw.update({k: v for k, v in extra.items() if v is not None})
    for old, new in getattr(cls, "ALIASES", {}).items():
        if old in raw:
            raw[new] = raw.pop(old)
    ignored = getattr(cls, "IGNORED", {})
    for key in [k for k in raw if k in ignored]:
        logger.warning("%s: key %r has no effect here (%s); ignoring it", where, key, ignored[key])
        raw.pop(key)
    try:
        return cls(**_normalise_keys(raw, cls, where))
    except ValidationError as err:
        raise _explain(err, where) from None


def _comma_list(v: Any) -> Any:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


# ---------------------------------------------------------------- what to load


@dataclass
class ModelSpec:
    """A base directory, the adapters applied on it in order, and how the run prompted it."""

    base: str
    adapters: list[str] = field(default_factory=list)
    template: str = "auto"
    default_system: str | None = None
    enable_thinking: bool | None = None
    stage: str | None = None
    run_dir: str | None = None

    @property
    def tokenizer_dir(self) -> str:
        """The last adapter/run dir that saved a tokenizer (training may have changed it), else the base."""
        for d in reversed([*self.adapters, self.run_dir or ""]):
            if d and (Path(d) / "tokenizer_config.json").is_file():
                return d
        return self.base


def read_run_config(run_dir: str | Path) -> tuple[dict[str, Any], Path] | None:
    """A run's resolved config; a ``checkpoint-N`` dir uses its run's. ``None`` when there is none."""
    run = Path(run_dir)
    for candidate in (run / RUN_CONFIG, run.parent / RUN_CONFIG):
        if candidate.is_file():
            data = yaml.safe_load(candidate.read_text())
            if isinstance(data, dict) and "model_name_or_path" in data:
                return data, candidate
    return None


def resolve_run(run_dir: str | Path) -> ModelSpec:
    """What an SFT/PPO ``output_dir`` (or one of its checkpoints) consists of, from its config.

    LoRA SFT continues the *last* listed adapter (``load_for_training``), so the run's adapter
    replaces it; PPO merges *every* listed adapter and trains a new one on top
    (``alignkit.train.ppo.build_models``). A full fine-tune saved a whole model: it is the base.
    """
    run = check_model_dir(str(run_dir), "run_dir")
    found = read_run_config(run)
    if found is None:
        raise FileNotFoundError(
            f"run_dir {run}: no {RUN_CONFIG} here or in its parent; give model_name_or_path "
            "(and adapter_name_or_path) instead"
        )
    cfg, cfg_path = found
    stage = cfg.get("stage")
    if stage == "rm":
        raise ValueError(
            f"{run} is a reward-model run (stage: rm, {cfg_path}): it scores text and cannot generate. "
            "Use it as reward_model (reward_model_type: full or lora), or `alignkit export` it as a "
            "*ForSequenceClassification directory."
        )
    prior = [str(p) for p in (cfg.get("adapter_name_or_path") or [])]
    if (run / "adapter_config.json").is_file():
        before = prior if stage == "ppo" else prior[:-1]
        base, adapters = str(cfg["model_name_or_path"]), [*before, str(run)]
    elif (run / "config.json").is_file():
        base, adapters = str(run), []
    else:
        raise FileNotFoundError(f"run_dir {run}: neither adapter_config.json (LoRA) nor config.json (full model)")
    for path, what in [(base, "model_name_or_path"), *[(a, "adapter_name_or_path") for a in adapters]]:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{cfg_path}: {what} {path!r} is not a directory (relative to {Path.cwd()})")
    return ModelSpec(
        base=base,
        adapters=adapters,
        template=cfg.get("template") or "auto",
        default_system=cfg.get("default_system"),
        enable_thinking=cfg.get("enable_thinking"),
        stage=stage,
        run_dir=str(run),
    )


def build_spec(
    model: str | None,
    adapters: list[str] | None = None,
    template: str | None = None,
    default_system: str | None = None,
    enable_thinking: bool | None = None,
) -> ModelSpec:
    """``model`` is a model dir or a run dir; explicit adapters are applied literally, in order.

    Template settings not given are read from the run (or the last adapter's run config).
    """
    if model is None:
        raise ConfigError("key 'model_name_or_path' (or 'run_dir') is required")
    is_run = not adapters and read_run_config(model) is not None
    spec = resolve_run(model) if is_run else ModelSpec(base=str(check_model_dir(model)), adapters=list(adapters or []))
    if not is_run and spec.adapters:
        _warn_missing_prior(spec.adapters)
        found = read_run_config(spec.adapters[-1])
        if found:
            run_cfg = found[0]
            spec.template = run_cfg.get("template") or "auto"
            spec.default_system = run_cfg.get("default_system")
            spec.enable_thinking = run_cfg.get("enable_thinking")
    spec.template = template or spec.template
    spec.default_system = default_system if default_system is not None else spec.default_system
    spec.enable_thinking = enable_thinking if enable_thinking is not None else spec.enable_thinking
    return spec


def _warn_missing_prior(adapters: list[str]) -> None:
    """A PPO adapter was trained on base + its SFT adapters; applying it alone gives another model."""
    for i, path in enumerate(adapters):
        found = read_run_config(path)
        if not found or found[0].get("stage") != "ppo":
            continue
        missing = [p for p in found[0].get("adapter_name_or_path") or [] if p not in adapters[:i]]
        if missing:
            logger.warning(
                "adapter %s was trained on top of %s (its %s), which is not applied before it; "
                "pass the run dir itself to apply everything in order", path, missing, found[1]
            )


def base_dtype(path: str) -> torch.dtype:
    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_merged(spec: ModelSpec, dtype: torch.dtype, trust_remote_code: bool = False, device_map: str | None = None):
    """The base with every adapter merged in order (a plain ``PreTrainedModel``)."""
    check_model_dir(spec.base)
    model = AutoModelForCausalLM.from_pretrained(
        spec.base, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map
    )
    return merge_adapters(model, spec.adapters).eval()


# ---------------------------------------------------------------- chat template


def _lit(s: str | None) -> str:
    """A jinja string literal (JSON escaping is valid jinja escaping)."""
    return "none" if s is None else json.dumps(s, ensure_ascii=False)


def template_jinja(template: Template, default_system: str | None, eos_token: str) -> str:
    """A jinja ``chat_template`` that renders exactly like ``template.render`` (with the eos token
    closing assistant turns where the template has no end-of-turn marker, as in training)."""
    system = template.default_system if default_system is None else default_system
    eot = template.eot if template.eot is not None else eos_token
    head, tail = template.system.split("{content}")
    parts = [
        f"{{%- set default_system = {_lit(system)} -%}}",
        f"{{{{- {_lit(template.prefix)} -}}}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set system = default_system -%}{%- set loop_messages = messages -%}{%- endif -%}",
        f"{{%- if system -%}}{{{{- {_lit(head)} + system + {_lit(tail)} -}}}}{{%- endif -%}}",
        "{%- set ns = namespace(last_user=-1) -%}"
        "{%- for m in loop_messages -%}{%- if m['role'] != 'assistant' -%}{%- set ns.last_user = loop.index0 -%}"
        "{%- endif -%}{%- endfor -%}",
        "{%- for m in loop_messages -%}",
    ]
    for role in ("user", "tool"):
        before, after = getattr(template, role).split("{content}")
        keyword = "if" if role == "user" else "elif"
        parts.append(f"{{%- {keyword} m['role'] == '{role}' -%}}{{{{- {_lit(before)} + m['content'] + {_lit(after)} -}}}}")
    parts.append("{%- elif m['role'] == 'assistant' -%}{%- set content = m['content'] -%}")
    if template.thinking:
        # Qwen3 drops the reasoning of turns before the latest user query; thinking off marks
        # answers without a thought with an empty think block (Template.segments).
        parts.append(
            "{%- if loop.index0 < ns.last_user and '</think>' in content -%}"
            "{%- set content = content.split('</think>')[-1].lstrip() -%}"
            "{%- elif enable_thinking is defined and enable_thinking is false and '<think>' not in content -%}"
            f"{{%- set content = {_lit(EMPTY_THINK)} + content -%}}{{%- endif -%}}"
        )
    parts += [
        f"{{{{- {_lit(template.assistant_start)} + content + {_lit(eot + template.turn_sep)} -}}}}",
        "{%- endif -%}{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {_lit(template.assistant_start)} -}}}}",
    ]
    if template.thinking:
        parts.append(f"{{%- if enable_thinking is defined and enable_thinking is false -%}}{{{{- {_lit(EMPTY_THINK)} -}}}}{{%- endif -%}}")
    parts.append("{%- endif -%}")
    return "".join(parts)


def system_override_jinja(chat_template: str, default_system: str) -> str:
    """Wrap a tokenizer's own template so a conversation without a system message gets ``default_system``."""
    return (
        "{%- if not (messages and messages[0]['role'] == 'system') -%}"
        f"{{%- set messages = [{{'role': 'system', 'content': {_lit(default_system)}}}] + messages -%}}"
        "{%- endif -%}" + chat_template
    )


def export_chat_template(tokenizer, template_name: str, default_system: str | None) -> str | None:
    """The chat template to save, or ``None`` to keep the tokenizer's own."""
    if template_name in TEMPLATES:
        return template_jinja(TEMPLATES[template_name], default_system, tokenizer.eos_token or "")
    if default_system is not None and getattr(tokenizer, "chat_template", None):
        return system_override_jinja(tokenizer.chat_template, default_system)
    return None


# ---------------------------------------------------------------- config


class ExportConfig(BaseModel):
    """``alignkit export`` keys (LLaMA-Factory's names)."""

    model_config = ConfigDict(extra="forbid")
    IGNORED: ClassVar[dict[str, str]] = {"finetuning_type": "whatever adapter_name_or_path lists is merged", "stage": "export has no stage"}

    model_name_or_path: str | None = Field(None, description="Base model directory (or a run dir).")
    adapter_name_or_path: list[str] | None = Field(
        None, description="Adapter dir or list (comma string allowed), merged in order, e.g. SFT then PPO."
    )
    run_dir: str | None = Field(
        None, description="An SFT/PPO output_dir: base and adapters are read from its alignkit_config.yaml."
    )
    template: str | None = Field(None, description="Chat template written to the export (default: the run's, else auto).")
    default_system: str | None = Field(None, description="Default system prompt baked into the exported chat template.")
    enable_thinking: bool | None = Field(None, description="Qwen3-style templates: thinking off in the verify prompts.")
    export_dir: str = Field(description="Directory the merged model is written to.")
    export_size: float = Field(5.0, gt=0, description="Largest safetensors shard, in GB (10^9 bytes).")
    export_device: Literal["cpu", "auto"] = Field("cpu", description="Merge on cpu, or auto (accelerate device_map).")
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Dtype of the exported weights (default: the base's)."
    )
    export_legacy_format: bool = Field(False, description="Must be false: alignkit writes safetensors only.")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the model directory.")
    verify: bool = Field(True, description="Reload the export and compare logits with base + adapters.")
    verify_tolerance: float | None = Field(
        None, gt=0, description="Relative logit tolerance (default 1e-4 fp32, 2e-2 bf16, 1e-2 fp16)."
    )
    vllm_check: bool = Field(False, description="Also load the export in vLLM and generate (needs a GPU and vllm).")

    @field_validator("adapter_name_or_path", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _comma_list(v)

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if self.export_legacy_format:
            raise ValueError("export_legacy_format: true (.bin files) is not supported; alignkit writes safetensors")
        if self.run_dir and (self.model_name_or_path or self.adapter_name_or_path):
            raise ValueError("give either run_dir, or model_name_or_path (+ adapter_name_or_path), not both")
        if not (self.run_dir or self.model_name_or_path):
            raise ValueError("key 'model_name_or_path' or 'run_dir' is required")
        return self

    def model_spec(self) -> ModelSpec:
        if self.run_dir:
            return build_spec(self.run_dir, None, self.template, self.default_system, self.enable_thinking)
        return build_spec(
            self.model_name_or_path, self.adapter_name_or_path, self.template, self.default_system, self.enable_thinking
        )


# ---------------------------------------------------------------- export


def is_reward_run(path: str | Path) -> bool:
    """An RM output_dir: ``stage: rm`` in its config, or the reward model's own metadata file."""
    from alignkit.models.reward_model import META_FILE

    found = read_run_config(path)
    return (found is not None and found[0].get("stage") == "rm") or (Path(path) / META_FILE).is_file()


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Merge, save and (unless ``cfg.verify`` is false) verify; returns the report written to
    ``export_dir/export_report.json`` (``report["passed"]`` is the verdict).

    A policy (SFT/PPO, LoRA or full) exports as ``*ForCausalLM``; a reward-model run as
    ``*ForSequenceClassification`` with ``num_labels=1`` (``export_reward_model``).
    """
    if cfg.run_dir and is_reward_run(cfg.run_dir):
        return export_reward_model(cfg)
    spec = cfg.model_spec()
    for adapter in spec.adapters:
        if (Path(adapter) / "score_head.safetensors").is_file():
            raise ValueError(f"adapter {adapter} is a reward model's; export it on its own with run_dir: {adapter}")
    out = Path(cfg.export_dir)
    _check_export_dir(out, spec)
    dtype = DTYPES[cfg.export_dtype] if cfg.export_dtype else base_dtype(spec.base)
    device_map = "auto" if cfg.export_device == "auto" and torch.cuda.is_available() else None
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir, trust_remote_code=cfg.trust_remote_code)

    # 1. Merge every adapter in order into the base; only the policy adapter is read from a
    #    PPO dir, so value head and critic never enter the weights.
    model = load_merged(spec, dtype, cfg.trust_remote_code, device_map)
    base_arch = AutoConfig.from_pretrained(spec.base, trust_remote_code=cfg.trust_remote_code).architectures
    model.config.architectures = base_arch

    # 2. Generation config: stop on the template's end-of-turn token too, as training did.
    from alignkit.train.rollout import stop_token_ids

    template = get_template(spec.template, tokenizer)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, template, model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    # 3. Save weights (sharded), tokenizer with the run's chat template, extras.
    model.save_pretrained(out, max_shard_size=int(cfg.export_size * 1e9))
    del model
    chat_template = export_chat_template(tokenizer, spec.template, spec.default_system)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    extras = copy_extras(spec, out)

    report: dict[str, Any] = {
        "export_dir": str(out),
        "base": spec.base,
        "adapters": spec.adapters,
        "run_dir": spec.run_dir,
        "template": spec.template,
        "default_system": spec.default_system,
        "dtype": str(dtype).removeprefix("torch."),
        "extras": extras,
    }
    if cfg.verify:
        report["verify"] = verify_export(out, spec, dtype, cfg.verify_tolerance, cfg.trust_remote_code)
        report["passed"] = all(c["ok"] for c in report["verify"].values() if isinstance(c, dict) and "ok" in c)
    else:
        report["verify"] = "skipped: --no-verify"
        report["passed"] = None
    return _finish(report, cfg, out, lambda: vllm_check(out))


def _finish(report: dict[str, Any], cfg: ExportConfig, out: Path, run_vllm) -> dict[str, Any]:
    report["vllm"] = run_vllm() if cfg.vllm_check else {"status": "skipped: not requested (--vllm-check)"}
    if report["vllm"].get("ok") is False:
        report["passed"] = False
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _check_export_dir(out: Path, spec: ModelSpec) -> None:
    """Never write into an input; remove stale weight files a previous export left (a different
    shard count would otherwise leave orphan shards next to the new index)."""
    inputs = {Path(p).resolve() for p in [spec.base, *spec.adapters, spec.run_dir] if p}
    if out.resolve() in inputs:
        raise ValueError(f"export_dir {out} is one of the inputs; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json", out / REPORT_FILE]:
        stale.unlink(missing_ok=True)


def copy_extras(spec: ModelSpec, out: Path) -> list[str]:
    """The PPO value head (and critic adapter) go to ``extras/``, outside the model weights."""
    src = Path(spec.run_dir or (spec.adapters[-1] if spec.adapters else spec.base))
    copied = []
    for name in EXTRA_FILES:
        if (src / name).is_file():
            (out / EXTRAS_DIR).mkdir(exist_ok=True)
            shutil.copy2(src / name, out / EXTRAS_DIR / name)
            copied.append(f"{EXTRAS_DIR}/{name}")
    for name in EXTRA_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / EXTRAS_DIR / name, dirs_exist_ok=True)
            copied.append(f"{EXTRAS_DIR}/{name}/")
    return copied


# ---------------------------------------------------------------- verification


def weight_files(out: Path) -> tuple[list[str], dict[str, Any]]:
    """The safetensors files of an export and a check that the index (if any) matches them."""
    index = out / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors"], {"ok": (out / "model.safetensors").is_file(), "sharded": False}
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    problems = [f"missing shard {f}" for f in files if not (out / f).is_file()]
    for f in files:
        if (out / f).is_file():
            with safe_open(str(out / f), "pt") as st:
                keys = set(st.keys())
            problems += [f"{k} in {f} but not indexed there" for k in keys if weight_map.get(k) != f]
            problems += [f"{k} indexed in {f} but absent" for k, v in weight_map.items() if v == f and k not in keys]
    orphans = sorted({p.name for p in out.glob("model*.safetensors")} - set(files))
    problems += [f"orphan shard {o}" for o in orphans]
    return files, {"ok": not problems, "sharded": True, "shards": len(files), "problems": problems[:10]}


def _weight_keys(out: Path, files: list[str]) -> list[str]:
    keys: list[str] = []
    for f in files:
        if (out / f).is_file():
            with safe_open(str(out / f), "pt") as st:
                keys += list(st.keys())
    return keys


def _logits(model, ids_list: list[list[int]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in ids_list]  # (T, V)


def reference_model(spec: ModelSpec, dtype: torch.dtype, trust_remote_code: bool = False):
    """Base + adapters through peft, *unmerged*: every adapter active at once. LoRA deltas add
    per linear layer, so this equals merging them in order without sharing any merge code."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(spec.base, dtype=dtype, trust_remote_code=trust_remote_code)
    if not spec.adapters:
        return model.eval()
    names = [f"a{i}" for i in range(len(spec.adapters))]
    model = PeftModel.from_pretrained(model, spec.adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], spec.adapters[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter(names)
    return model.eval()


def verify_export(
    out: Path, spec: ModelSpec, dtype: torch.dtype, tolerance: float | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Checks, each ``{"ok": bool, ...}``: strict plain reload, weight names, shards/index,
    architecture, and logits against the unmerged reference on ``VERIFY_PROMPTS``."""
    checks: dict[str, Any] = {}
    files, checks["shards"] = weight_files(out)
    keys = _weight_keys(out, files)
    bad = sorted(k for k in keys if any(part in k for part in FORBIDDEN_KEY_PARTS))
    checks["weight_names"] = {"ok": not bad and bool(keys), "num_tensors": len(keys), "forbidden": bad[:10],
                              "forbidden_parts": list(FORBIDDEN_KEY_PARTS)}

    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=dtype, output_loading_info=True, trust_remote_code=trust_remote_code
    )
    info = {k: sorted(map(str, v)) for k, v in info.items() if v}
    checks["plain_load"] = {"ok": not info, "loader": "AutoModelForCausalLM.from_pretrained", **info}
    base_arch = AutoConfig.from_pretrained(spec.base, trust_remote_code=trust_remote_code).architectures
    checks["architecture"] = {"ok": model.config.architectures == base_arch,
                              "export": model.config.architectures, "base": base_arch}

    tokenizer = AutoTokenizer.from_pretrained(out)
    template = get_template(spec.template, tokenizer)
    prompts = [
        template.render([{"role": "user", "content": p}], spec.default_system, True, spec.enable_thinking)
        for p in VERIFY_PROMPTS
    ]
    ids_list = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    got = _logits(model, ids_list)
    del model
    want = _logits(reference_model(spec, dtype, trust_remote_code), ids_list)
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
    scale = max(1.0, max(float(w.abs().max()) for w in want))
    rel = tolerance or TOLERANCE[dtype]
    top1 = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want, strict=True)) / sum(len(i) for i in ids_list)
    checks["logits"] = {
        "ok": diff <= rel * scale,
        "max_abs_diff": diff,
        "tolerance": rel * scale,
        "tolerance_rule": f"{rel:g} x max(1, max|reference logit|) = {rel:g} x {scale:.4g}",
        "reference": "base + adapters via peft, unmerged",
        "top1_agreement": top1,
        "prompts": len(ids_list),
        "tokens": sum(len(i) for i in ids_list),
    }
    return checks


def vllm_check(out: Path) -> dict[str, Any]:
    """Load the export in vLLM and generate; skipped (never faked) without a GPU or vllm."""
    try:
        import vllm
    except ImportError:
        return {"status": "skipped: no GPU/vLLM (vllm is not installed; pip install vllm)"}
    if not torch.cuda.is_available():
        return {"status": "skipped: no GPU/vLLM (no CUDA device)"}
    llm = vllm.LLM(model=str(out), dtype="auto", enforce_eager=True, gpu_memory_utilization=0.5)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=16)
    messages = [[{"role": "user", "content": p}] for p in VERIFY_PROMPTS]
    outputs = llm.chat(messages, params)
    texts = [o.outputs[0].text for o in outputs]
    return {"status": "ran", "ok": len(texts) == len(VERIFY_PROMPTS), "vllm_version": vllm.__version__,
            "samples": texts}


# ---------------------------------------------------------------- reward models


def export_reward_model(cfg: ExportConfig) -> dict[str, Any]:
    """An RM run (LoRA adapter + score head, or full) as one ``*ForSequenceClassification`` dir
    (``num_labels=1``, head at ``score.weight``), verified against the unmerged reward model."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.reward_model import load_reward_model
    from alignkit.rewards.model import encode_for_scoring

    run = str(check_model_dir(cfg.run_dir, "run_dir"))
    out = Path(cfg.export_dir)
    rm, tokenizer, meta = load_reward_model(run, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    spec = ModelSpec(base=meta.get("base_model") or run, adapters=list(meta.get("merged_adapters") or []),
                     template=cfg.template or meta.get("template") or "auto",
                     default_system=cfg.default_system if cfg.default_system is not None else meta.get("default_system"),
                     enable_thinking=meta.get("enable_thinking"), stage="rm", run_dir=run)
    _check_export_dir(out, spec)
    dtype = DTYPES[cfg.export_dtype] if cfg.export_dtype else base_dtype(spec.base)

    # 1. Merge the RM adapter; wrap backbone + head as the HF sequence classifier (no copy).
    backbone = rm.model.merge_and_unload().base_model if rm.is_lora else rm.backbone
    config = sequence_classifier_config(backbone.config, tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    setattr(model, model.base_model_prefix, backbone)
    model.score = rm.score
    model.to(dtype).save_pretrained(out, max_shard_size=int(cfg.export_size * 1e9))
    chat_template = export_chat_template(tokenizer, spec.template, spec.default_system)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    del model, rm, backbone

    report: dict[str, Any] = {"export_dir": str(out), "kind": "reward_model", "run_dir": run, "base": spec.base,
                              "template": spec.template, "dtype": str(dtype).removeprefix("torch."), "extras": []}
    if not cfg.verify:
        report["verify"], report["passed"] = "skipped: --no-verify", None
        return _finish(report, cfg, out, lambda: {"status": "skipped: the vLLM check covers causal-LM exports"})

    # 2. Verify: strict plain reload, names, architecture, scores vs the unmerged reward model.
    checks: dict[str, Any] = {}
    files, checks["shards"] = weight_files(out)
    keys = _weight_keys(out, files)
    bad = sorted(k for k in keys if any(part in k for part in RM_FORBIDDEN_KEY_PARTS))
    checks["weight_names"] = {"ok": not bad and "score.weight" in keys, "num_tensors": len(keys), "forbidden": bad[:10]}
    model, info = AutoModelForSequenceClassification.from_pretrained(out, dtype=dtype, output_loading_info=True)
    info = {k: sorted(map(str, v)) for k, v in info.items() if v}
    checks["plain_load"] = {"ok": not info, "loader": "AutoModelForSequenceClassification.from_pretrained", **info}
    checks["architecture"] = {"ok": model.config.architectures == config.architectures and model.config.num_labels == 1,
                              "export": model.config.architectures, "num_labels": model.config.num_labels}
    template = get_template(spec.template, tokenizer)
    seqs = [encode_for_scoring(tokenizer, template, p, "A short answer.", 1024, spec.default_system,
                               spec.enable_thinking) for p in VERIFY_PROMPTS]
    with torch.no_grad():
        got = torch.tensor([float(model(torch.tensor([s])).logits[0, 0]) for s in seqs])
        del model
        ref, _, _ = load_reward_model(run, dtype=dtype)
        want = torch.tensor([float(ref(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]) for s in seqs])
    diff, rel = float((got - want).abs().max()), cfg.verify_tolerance or TOLERANCE[dtype]
    scale = max(1.0, float(want.abs().max()))
    checks["scores"] = {"ok": diff <= rel * scale, "max_abs_diff": diff, "tolerance": rel * scale,
                        "tolerance_rule": f"{rel:g} x max(1, max|reference score|)",
                        "reference": "alignkit RewardModel from the run dir, unmerged", "export": got.tolist(),
                        "reference_scores": want.tolist()}
    report["verify"] = checks
    report["passed"] = all(c["ok"] for c in checks.values())
    return _finish(report, cfg, out, lambda: {"status": "skipped: the vLLM check covers causal-LM exports"})


def sequence_classifier_config(config, pad_token_id: int | None):
    """The backbone's config as its ``*ForSequenceClassification`` (one label; HF's classifier
    finds the last token through ``pad_token_id``)."""
    import copy

    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = copy.deepcopy(config)
    arch = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if arch is None:
        raise ValueError(f"model type {config.model_type!r} has no *ForSequenceClassification class in transformers")
    config.architectures, config.num_labels = [arch], 1
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return config


# ---------------------------------------------------------------- CLI


def cmd_export(args: argparse.Namespace) -> int:
    paths = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(paths) > 1:
        raise ConfigError(f"expected one config file, got {paths}; overrides are key=value")
    cfg = load_tool_config(
        ExportConfig, paths[0] if paths else None, overrides,
        run_dir=args.run_dir, export_dir=args.export_dir,
        verify=False if args.no_verify else None, vllm_check=True if args.vllm_check else None,
    )
    report = export_model(cfg)
    print(f"exported to {cfg.export_dir} ({report['dtype']}); extras: {report['extras'] or 'none'}")
    if isinstance(report["verify"], dict):
        numbers = report["verify"].get("logits") or report["verify"]["scores"]
        print(f"verify: {'PASSED' if report['passed'] else 'FAILED'} (max |diff| {numbers['max_abs_diff']:.3g},"
              f" tolerance {numbers['tolerance']:.3g}); details in {Path(cfg.export_dir) / REPORT_FILE}")
        for name, check in report["verify"].items():
            if not check["ok"]:
                print(f"  failed check {name}: {check}", file=sys.stderr)
    else:
        print(f"verify: {report['verify']}")
    print(f"vllm: {report['vllm']['status']}")
    return 0 if report["passed"] is not False else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="merge adapters into the base and save a plain HF model (verified)",
        description="alignkit export CONFIG.yaml [key=value ...]  |  alignkit export --from RUN_DIR --export_dir OUT\n"
        "Keys: " + ", ".join(ExportConfig.model_fields),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value", help="YAML config and/or key=value overrides")
    p.add_argument("--from", dest="run_dir", help="an SFT/PPO output_dir to export (reads its alignkit_config.yaml)")
    p.add_argument("--export_dir", "--export-dir", dest="export_dir", help="output directory")
    p.add_argument("--no-verify", action="store_true", help="skip reload + logits verification")
    p.add_argument("--vllm-check", action="store_true", help="also load the export in vLLM and generate (GPU)")
    p.set_defaults(func=cmd_export)

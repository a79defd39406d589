"""One typed config per stage, read from YAML plus ``key=value`` overrides.

Keys follow LLaMA-Factory's names for shared concepts so existing YAML files carry over.
Unknown keys are errors with a "did you mean" suggestion; LLaMA-Factory keys that mean
nothing here are accepted with a warning; keys whose behaviour alignkit does not provide are
errors that say so. Nothing is silently ignored.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import logging
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, Tag, ValidationError, field_validator, model_validator

from alignkit.config_checks import VALUE_REASONS, describe_problems, path_problems, template_problems

logger = logging.getLogger(__name__)


# report_to names; the trackers among them go through accelerate (alignkit/train/tracking.py).
REPORT_TO = ("tensorboard", "wandb", "swanlab", "mlflow", "jsonl", "none")


class ConfigError(ValueError):
    """A config problem, phrased for the user: which file, which key, what was expected."""


# Every LLaMA-Factory training key and its answer here (assets/llamafactory_keys.json): keys with no
# meaning in alignkit are accepted with one warning each (IGNORED_KEYS); keys whose behaviour alignkit
# does not provide are errors that say why (UNSUPPORTED_KEYS); the rest are config fields or ALIASES.
LLAMAFACTORY_KEYS = json.loads((Path(__file__).parent / "assets" / "llamafactory_keys.json").read_text())
IGNORED_KEYS: dict[str, str] = dict(LLAMAFACTORY_KEYS["ignored"])
UNSUPPORTED_KEYS: dict[str, str] = dict(LLAMAFACTORY_KEYS["unsupported"])
# Ignored keys that mean something only at one value: any other value is an error.
IGNORED_ONLY_AT = {"do_sample": True}

ALIASES = {
    "evaluation_strategy": "eval_strategy",
    "system_prompt": "default_system",
    # Critic-free RL: TRL/verl call the KL coefficient beta, OpenRLHF counts samples per prompt.
    "beta": "init_kl_coef",
    "n_samples_per_prompt": "num_generations",
    # LLaMA-Factory's vLLM keys.
    "vllm_maxlen": "vllm_max_model_len",
    "vllm_gpu_util": "vllm_gpu_memory_utilization",
}

# Key names whose values are secrets. Narrow on purpose: ``max_new_tokens`` is not a secret.
SECRET_KEY = re.compile(
    r"(api_?key|secret|password|passwd|authorization|cookie|(^|_)(access_|hf_|api_|auth_|bearer_)?token$)",
    re.IGNORECASE,
)
REDACTED = "***REDACTED***"
# ``${ENV_VAR}`` in a value: a template naming where the secret comes from, not the secret itself.
ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class StageConfig(BaseModel):
    """Keys every stage shares (model, adapters, data, optimisation, logging, checkpoints)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Model
    stage: Literal["sft", "rm", "ppo"] = Field(description="Training stage: sft | rm | ppo.")
    model_name_or_path: str = Field(description="Local Hugging Face model directory (base model).")
    adapter_name_or_path: list[str] | None = Field(
        None, description="Adapter dir(s) to start from (comma list): SFT/RM continue the last and merge the rest; PPO merges all."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the model directory.")
    do_train: bool = Field(True, description="Must be true: alignkit train always trains.")
    finetuning_type: Literal["lora", "full"] = Field("lora", description="lora (peft adapter) or full fine-tuning.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha (default 2 x lora_rank).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout probability.")
    lora_target: list[str] = Field(
        ["all"], description="Module names to adapt (list or comma string); 'all' = every linear layer and MoE expert "
        "weight but the LM head, MoE routers and frozen vision parts (docs/models.md)."
    )
    moe_aux_loss_coef: float = Field(
        0.0, ge=0.0, description="MoE models, SFT/RM/DPO/KTO: weight of the router load-balancing loss added to the "
        "loss (0: off; Qwen3-MoE pretrains with 0.001). PPO/GRPO do not add it; DeepSeek-V3 has none (docs/models.md)."
    )
    freeze_vision_tower: bool = Field(True, description="Vision-language models: keep the vision encoder frozen.")
    image_max_pixels: int = Field(
        768 * 768, ge=1, description="Vision-language models: an image over this many pixels (width x height) is "
        "scaled down, aspect kept, before the image processor, as LLaMA-Factory does (its default)."
    )
    image_min_pixels: int = Field(
        32 * 32, ge=1, description="Vision-language models: an image under this many pixels is scaled up, as "
        "LLaMA-Factory does (its default)."
    )
    freeze_multi_modal_projector: bool = Field(
        True, description="Vision-language models: keep the projector (vision features -> text embeddings) frozen."
    )
    # Data
    dataset: list[str] = Field(description="Dataset names from dataset_info.json, or .json/.jsonl paths (comma list).")
    dataset_dir: str = Field("data", description="Directory holding dataset_info.json and the data files.")
    template: str = Field(
        "auto", description="Chat template: auto (tokenizer's own), qwen, qwen3, llama3, chatml, empty, or a "
        "LLaMA-Factory template name (llama2, mistral, gemma, glm4, ...: mapped, see docs/data.md)."
    )
    default_system: str | None = Field(None, description="Replaces the template's default system prompt.")
    enable_thinking: bool | None = Field(
        None, description="Qwen3-style templates: false renders with thinking off; unset is true with a thinking "
        "template (LLaMA-Factory's default: an answer without a thought gets an empty think block)."
    )
    cutoff_len: int = Field(1024, ge=8, description="Maximum tokens per example (prompt + response).")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many rows per dataset.")
    val_size: float | int = Field(0.0, ge=0.0, description="Held-out split: fraction in (0,1) or a row count >= 1.")
    skip_bad_rows: bool = Field(False, description="Skip malformed rows (reporting how many) instead of stopping.")
    # Output
    output_dir: str = Field(description="Where adapters, checkpoints, logs and the resolved config go.")
    overwrite_output_dir: bool = Field(False, description="Allow writing into a non-empty output_dir.")
    # Optimisation
    per_device_train_batch_size: int = Field(1, ge=1, description="Examples per device per micro-batch.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Examples per device per eval batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored if max_steps>0).")
    max_steps: int = Field(-1, description="Total optimizer steps; -1 derives it from num_train_epochs.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: float = Field(
        0, ge=0, description="Linear warm-up steps (overrides warmup_ratio when >= 1); a value below 1 is a ratio."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Warm-up as a fraction of total steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables).")
    optim: Literal["adamw_torch", "adamw", "adamw_torch_fused", "sgd"] = Field(
        "adamw_torch", description="Optimizer: adamw_torch (alias adamw), adamw_torch_fused (GPU), sgd."
    )
    bf16: bool = Field(False, description="Load and train in bfloat16.")
    fp16: bool = Field(False, description="Load in float16 (LoRA weights stay float32).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the backward pass.")
    seed: int = Field(42, description="Random seed (each rank adds its rank index).")
    # Logging and checkpoints
    logging_steps: int = Field(10, ge=1, description="Log metrics every N optimizer steps.")
    report_to: list[str] = Field(
        ["tensorboard"], description="Trackers, one or a list: tensorboard, wandb, swanlab, mlflow (through "
        "accelerate's integrations; each needs its package), jsonl (always on), none."
    )
    plot_loss: bool = Field(False, description="Write PNG plots of the logged curves at the end of the run.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field("no", description="When to evaluate on the val split.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (eval_strategy: steps).")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(None, ge=1, description="Keep at most this many checkpoints.")
    resume_from_checkpoint: str | bool | None = Field(
        None, description="Checkpoint directory to resume from, or true for the latest in output_dir."
    )

    @field_validator("adapter_name_or_path", "dataset", "lora_target", "report_to", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("report_to", mode="after")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in REPORT_TO:
                close = difflib.get_close_matches(name, REPORT_TO, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown tracker {name!r}{hint} Choose from {', '.join(REPORT_TO)}")
        return v

    @field_validator("warmup_steps", mode="after")
    @classmethod
    def _whole_steps(cls, v: float) -> float | int:
        # Below 1 it is a ratio (moved to warmup_ratio in _check); at or above 1 a step count.
        return v if v < 1 else int(v)

    @field_validator("val_size", mode="after")
    @classmethod
    def _val_count(cls, v: float | int) -> float | int:
        # A whole number >= 1 is a row count even when YAML wrote it as 20.0.
        return int(v) if v >= 1 and float(v).is_integer() else v

    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # `eval_strategy: no` in a YAML file parses as False

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if not self.do_train:
            raise ValueError("do_train: false is not supported by `alignkit train`; use predict/compare to evaluate")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one")
        if self.eval_strategy != "no" and self.val_size <= 0:
            raise ValueError(f"eval_strategy: {self.eval_strategy} needs val_size > 0")
        if 0 < self.warmup_steps < 1:  # as in current transformers: a fraction of the total steps
            object.__setattr__(self, "warmup_ratio", self.warmup_steps)
            object.__setattr__(self, "warmup_steps", 0)
        if self.enable_thinking is None:
            from alignkit.data.templates import is_thinking_template

            if is_thinking_template(self.template):
                # LLaMA-Factory's default (enable_thinking: true), so a qwen3 config renders the same text
                # there and here: an answer without a thought is trained after an empty think block.
                object.__setattr__(self, "enable_thinking", True)
        return self

    @property
    def alpha(self) -> int:
        return self.lora_alpha or 2 * self.lora_rank


class SFTConfig(StageConfig):
    stage: Literal["sft"] = Field("sft", description="Training stage.")


class RMConfig(StageConfig):
    stage: Literal["rm"] = Field("rm", description="Training stage.")


STAGES: dict[str, type[StageConfig]] = {"sft": SFTConfig, "rm": RMConfig}
# Stages whose config lives next to their trainer; imported on first use.
LAZY_STAGES = {"ppo": "alignkit.train.ppo_config", "dpo": "alignkit.train.dpo_config",
               "kto": "alignkit.train.dpo_config"}


def register_stage(name: str, cls: type[StageConfig]) -> None:
    STAGES[name] = cls


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value typed as YAML would type it (``lr=1e-4`` -> float)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    # YAML 1.1 reads yes/no/on/off as booleans; on a command line they are words ("eval_strategy=no").
    value = raw if raw.lower() in {"yes", "no", "on", "off", "y", "n"} else yaml.safe_load(raw) if raw != "" else None
    # YAML 1.1 reads "1e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            pass
    return key.strip(), value


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def normalise_keys(raw: dict, cls: type[BaseModel], where: str) -> dict:
    """``raw`` with aliases renamed and ignored keys dropped (one warning each). Unknown and
    unsupported keys are one ``ConfigError`` naming ``where`` and every such key at once, an
    unknown key with a "did you mean" suggestion."""
    out, problems = sort_keys(raw, cls, where)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(m for _, m in problems) + ". " + keys_hint(len(problems)))
    return out


def keys_hint(n: int) -> str:
    return ("Remove or rename " + ("this key" if n == 1 else f"these {n} keys")
            + " (`alignkit keys <stage>` lists every key).")


def sort_keys(raw: dict, cls: type[BaseModel], where: str) -> tuple[dict, list[tuple[str, str]]]:
    """The known keys of ``raw`` (aliases renamed, ignored keys dropped with one warning each), and
    a ``(key, problem)`` for each unknown or unsupported one."""
    out: dict[str, Any] = {}
    known = set(cls.model_fields) | getattr(cls, "ALSO_ACCEPTED", set())  # keys a model_validator moves
    problems: list[tuple[str, str]] = []
    for key, value in raw.items():
        key = ALIASES.get(key, key)
        if key in known:
            out[key] = value
        elif key in IGNORED_KEYS and IGNORED_ONLY_AT.get(key, value) == value:
            logger.warning("%s: key %r has no effect in alignkit (%s); ignoring it", where, key, IGNORED_KEYS[key])
        elif key in IGNORED_KEYS or key in UNSUPPORTED_KEYS:
            problems.append((key, f"key {key!r} is not supported ({UNSUPPORTED_KEYS.get(key) or IGNORED_KEYS[key]})"))
        elif (owner := _stage_of(key)) and not issubclass(cls, StageConfig):
            # A training YAML reused for a tool (export, predict): its training keys mean nothing here.
            logger.warning("%s: key %r is a training key (stage %s); ignoring it here", where, key, owner)
        elif owner:
            problems.append((key, f"key {key!r} belongs to stage {owner}, not to this {cls.__name__}"))
        else:
            problems.append((key, f"unknown key {key!r}{_did_you_mean(key, known | set(ALIASES))}"))
    return out, problems


def _stage_of(key: str) -> str | None:
    """The first registered stage whose config has ``key`` (PPO's keys in an SFT config)."""
    for stage, module in LAZY_STAGES.items():
        if stage not in STAGES and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    return next((name for name, c in STAGES.items() if key in c.model_fields), None)


def _did_you_mean(key: str, known: set[str]) -> str:
    """The closest known key, only if every word of ``key`` is close to a word of it: a typo
    (``learning_rat``), not an unrelated key that shares a suffix (``ref_model`` is not ``reward_model``)."""
    for cand in difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6):
        words = cand.split("_")
        if all(difflib.get_close_matches(w, words, n=1, cutoff=0.6) for w in key.split("_")):
            return f"; did you mean {cand!r}?"
    return ""


def nested_models(annotation: Any) -> dict[str | None, type[BaseModel]]:
    """The pydantic models a field's type holds, by union tag (``None``: an untagged model)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *metadata = get_args(annotation)
        found = nested_models(inner)
        tags = [m.tag for m in metadata if isinstance(m, Tag)]
        return {tags[0]: found[None]} if tags and None in found else found
    if origin in (Union, types.UnionType):
        return {k: v for arg in get_args(annotation) for k, v in nested_models(arg).items()}
    return {None: annotation} if isinstance(annotation, type) and issubclass(annotation, BaseModel) else {}


def _walk(cls: type[BaseModel] | None, loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """The key path of a pydantic error location as the user wrote it, and the model it ends in.

    A discriminated union adds the member's tag to the location (``reward_api.custom.payload``);
    the user never wrote that part, so it is dropped (``reward_api.payload``).
    """
    path: list[str] = []
    model, tagged = cls, {}
    for part in loc:
        if part in tagged:
            model, tagged = tagged[part], {}
            continue
        path.append(str(part))
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        tagged = nested_models(field.annotation) if field is not None else {}
        model = tagged.pop(None, None)
    return path, model


def explain_validation_error(err: ValidationError, where: str, cls: type[BaseModel] | None = None) -> ConfigError:
    """pydantic's errors as one ``ConfigError``: each key path as written in the YAML and what was
    expected (secrets redacted); given the validated ``cls``, unknown keys at any depth get a
    "did you mean" suggestion."""
    return ConfigError(f"{where}: " + "; ".join(m for _, m in validation_problems(err, cls)))


def validation_problems(err: ValidationError, cls: type[BaseModel] | None = None) -> list[tuple[str | None, str]]:
    """pydantic's errors as ``(top-level key, problem)``: the key path as written in the YAML and
    what was expected (secrets redacted; a refused choice says why); unknown keys at any depth get
    a "did you mean" suggestion."""
    out: list[tuple[str | None, str]] = []
    for e in err.errors():
        top = str(e["loc"][0]) if e["loc"] else None
        if e["type"] == "extra_forbidden":
            path, owner = _walk(cls, e["loc"][:-1])
            key = str(e["loc"][-1])
            known = set(owner.model_fields) | getattr(owner, "ALSO_ACCEPTED", set()) if owner else set()
            out.append((top, f"unknown key {'.'.join([*path, key])!r}{_did_you_mean(key, known)}"))
            continue
        loc = ".".join(_walk(cls, e["loc"])[0]) or "(config)"
        if e["type"] == "missing":
            out.append((top, f"key {loc!r} is required"))
            continue
        got = e.get("input")
        shown = REDACTED if SECRET_KEY.search(loc) else repr(redact(got))
        msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        if e["type"] == "literal_error":
            reason = VALUE_REASONS.get(loc, {}).get(got, "alignkit implements only these")
            msg = f"{msg} ({reason})"
        out.append((top, f"key {loc!r}: {msg} (got {shown})" if e["loc"] else msg))
    return out


def read_raw(
    path: str | Path | None, overrides: list[str] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The YAML file's mapping (if any), then ``extra`` keys (from Python callers), then the
    ``key=value`` overrides (dotted keys reach into nested mappings); not yet validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of key: value at the top level")
        raw.update(loaded)
    raw.update(extra or {})
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, ALIASES.get(key, key), value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, check_paths: bool = False,
                **extra: Any) -> StageConfig:
    """Read YAML, apply overrides, validate against the config class of its ``stage``.

    ``extra`` keys (from Python callers) sit between the file and the overrides. Every problem is
    reported in one ``ConfigError``: keys, values (with why a choice is refused), the stage, the
    template name and, when anything is wrong or ``check_paths`` is set (``alignkit train``), the
    dataset and the model/adapter/output paths; a problem a command-line override caused is
    blamed on that override, not on the file."""
    where = str(path) if path else "config"
    raw = read_raw(path, overrides, extra)
    from_cli = {ALIASES.get(k, k).split(".")[0]: item for item in overrides or [] for k in [parse_override(item)[0]]}
    problems: list[tuple[str | None, str]] = []
    n_keys = 0  # unknown or unsupported keys among the problems
    stage = raw.get("stage")
    if stage in LAZY_STAGES and stage not in STAGES:
        importlib.import_module(LAZY_STAGES[stage])
    cfg = None
    if stage not in STAGES:
        problems.append(("stage", stage_problem(stage)))
    else:
        cls = STAGES[stage]
        known, problems = sort_keys(raw, cls, where)
        n_keys = len(problems)
        try:
            cfg = cls(**known)
        except ValidationError as err:
            problems += validation_problems(err, cls)
    problems += [("template", p) for p in template_problems(raw.get("template", "auto"))]
    if problems or check_paths:
        problems += path_problems(raw)
    if problems:
        raise ConfigError(describe_problems(problems, where, from_cli) + (f" {keys_hint(n_keys)}" if n_keys else ""))
    warn_slow_precision(cfg, where)
    return cfg


def stage_problem(stage: Any) -> str:
    stages = ", ".join(sorted({*STAGES, *LAZY_STAGES}))
    if stage == "pt":
        return (f"key 'stage': 'pt' (LLaMA-Factory's pre-training on raw text) is not a stage here; the stages are "
                f"{stages}")
    return f"key 'stage' must be one of {stages}, got {stage!r}"


def warn_slow_precision(cfg: StageConfig, where: str) -> None:
    """bf16/fp16 without an accelerator is emulated on most CPUs: the run works but is slow."""
    if not (cfg.bf16 or cfg.fp16):
        return
    import torch  # only when a half-precision key is set

    if torch.accelerator.is_available():
        return
    key = "bf16" if cfg.bf16 else "fp16"
    # CPUs with AVX512-BF16 or AMX compute bf16 natively; none computes fp16 matmuls natively.
    native = cfg.bf16 and any(getattr(torch.cpu, f, lambda: False)() for f in
                              ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    if not native:
        logger.warning("%s: %s: true on a CPU without native %s support: training will be slow. "
                       "Set %s: false (or pass %s=false) to train in float32.", where, key, key, key, key)


def redact(obj: Any, _key: str = "") -> Any:
    """A copy with values under secret-looking keys (and header values) replaced."""
    if isinstance(obj, dict):
        return {
            k: (REDACTED if (SECRET_KEY.search(str(k)) or _key == "headers") and _is_secret_value(v)
                else redact(v, str(k)))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v, _key) for v in obj]
    return obj


def _is_secret_value(v: Any) -> bool:
    """A value to mask under a secret-looking key: anything but ``None``, a mapping, or a
    ``${ENV_VAR}`` template (kept as written, so a saved config still says where the secret comes from)."""
    return v is not None and not isinstance(v, dict) and not (isinstance(v, str) and ENV_VAR.search(v))


CONFIG_FILE = "alignkit_config.yaml"  # the resolved config, saved in every run's output_dir


def save_config(cfg: BaseModel, out_dir: str | Path, name: str = CONFIG_FILE) -> Path:
    """Write the resolved config (secrets redacted) next to the run's outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = redact(json.loads(cfg.model_dump_json()))
    path = out / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path

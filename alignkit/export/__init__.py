"""``alignkit export``: merge adapters into the base, drop training-only heads, save, verify.

The output is a plain Hugging Face directory: safetensors shards (+ index), the tokenizer, a
jinja chat template matching the one the run trained with, and a generation config whose EOS
ids include the template's end-of-turn token. PPO's value head never enters the weights (only
the policy adapter is merged); it is copied to ``extras/`` for anyone who continues PPO.

Verification (on by default) reloads the export with plain ``AutoModelForCausalLM`` and checks
it against the unmerged base + adapters (see ``verify_export``); the verdict goes to
``export_report.json``.
"""

from alignkit.export.cli import add_parser, cmd_export
from alignkit.export.config import DTYPES, ExportConfig
from alignkit.export.merge import export_model, load_merged
from alignkit.export.output import REPORT_FILE, base_dtype, copy_extras
from alignkit.export.reward import export_reward_model, is_reward_run, sequence_classifier_config
from alignkit.export.template import export_chat_template, system_override_jinja, template_jinja
from alignkit.export.verify import (
    TOLERANCE,
    VERIFY_PROMPTS,
    reference_model,
    verify_export,
    vllm_check,
    weight_files,
)

__all__ = [
    "DTYPES",
    "REPORT_FILE",
    "TOLERANCE",
    "VERIFY_PROMPTS",
    "ExportConfig",
    "add_parser",
    "base_dtype",
    "cmd_export",
    "copy_extras",
    "export_chat_template",
    "export_model",
    "export_reward_model",
    "is_reward_run",
    "load_merged",
    "reference_model",
    "sequence_classifier_config",
    "system_override_jinja",
    "template_jinja",
    "verify_export",
    "vllm_check",
    "weight_files",
]

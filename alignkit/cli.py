"""``alignkit <command> ...`` — parse arguments and dispatch; the work lives in the stages."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from typing import get_origin

from alignkit import __version__

TRAIN_HELP = """\
Train one stage from a YAML config. The config's `stage:` key picks it:
  sft  supervised fine-tuning (LoRA or full)
  rm   pairwise reward model
  ppo  on-policy RL: PPO with a value head, or critic-free GRPO, Dr. GRPO, RLOO, REINFORCE++
       (advantage_estimator); reward: rule, trained RM, or HTTP judge
  dpo  offline preference pairs: DPO, IPO, hinge, ORPO, SimPO (pref_loss)
  kto  KTO on desirable/undesirable answers (kto_tag) or on pairs
Keys follow LLaMA-Factory's names. Overrides are typed like YAML:
  alignkit train sft.yaml learning_rate=1e-4 lora_target=q_proj,v_proj
"""

# stage name -> module with ``run(cfg)``; a stage is listed once its module exists.
STAGE_MODULES = {"sft": "alignkit.train.sft", "rm": "alignkit.train.rm", "ppo": "alignkit.train.ppo",
                 "dpo": "alignkit.train.dpo", "kto": "alignkit.train.kto"}


def available_stages() -> list[str]:
    return [s for s, mod in STAGE_MODULES.items() if importlib.util.find_spec(mod) is not None]


def cmd_train(args: argparse.Namespace) -> int:
    from alignkit.config import load_config
    from alignkit.models.gguf import resolve_model_path

    cfg = load_config(args.config, args.overrides, check_paths=True)
    # A .gguf model is converted once (cached) before the stage reads any file of it.
    cfg.model_name_or_path = resolve_model_path(cfg.model_name_or_path)
    module = importlib.import_module(STAGE_MODULES[cfg.stage])
    out = module.run(cfg)
    end_distributed()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch: rank 0 reports
        return 0
    print(f"done: outputs in {out}")
    write_training_report(out)
    print(f"  next: alignkit export --from {out} --export_dir {out}-merged   (or alignkit report {out})")
    return 0


def end_distributed() -> None:
    """Tear the process group down at exit, as PyTorch asks, rather than in interpreter shutdown,
    where a rank that had finished a 2-process gloo run was seen to abort ("terminate called without
    an active exception", SIGABRT) and fail the launch. At exit, not now: a script may run several
    stages in one process on the same group."""
    import atexit

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and not getattr(end_distributed, "registered", False):
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
        end_distributed.registered = True


def write_training_report(out) -> None:
    """The report is written here, not by the trainer (train/ never imports report/); a plotting
    problem must not fail a finished run."""
    from alignkit.report import write_report

    try:
        print(f"  training report: {write_report(out)}")
    except Exception as err:  # any report failure is reported; the run stands
        print(f"  could not write the training report ({err}); try `alignkit report {out}`")


def cmd_keys(args: argparse.Namespace) -> int:
    """Every config key of a stage with its type, default and help text."""
    import importlib as _il

    from alignkit.config import LAZY_STAGES, STAGES, nested_models

    if args.stage in LAZY_STAGES:
        _il.import_module(LAZY_STAGES[args.stage])
    for name, field in STAGES[args.stage].model_fields.items():
        ann = field.annotation
        kind = str(ann).replace("typing.", "") if get_origin(ann) else getattr(ann, "__name__", str(ann))
        if nested_models(ann):  # a nested block (reward_api): its keys are in the docs the help names
            kind = "mapping"
        default = "required" if field.is_required() else f"default {field.default!r}"
        print(f"{name}: {kind} ({default})\n    {field.description or ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit", description="RLHF for practitioners: SFT, reward models, PPO, GRPO/RLOO/REINFORCE++ and DPO/KTO against your own judge."
    )
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also ALIGNKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help=f"train a stage ({', '.join(available_stages())}) from a YAML config",
        description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    train.set_defaults(func=cmd_train)

    keys = sub.add_parser("keys", help="list a stage's config keys with types, defaults and help")
    keys.add_argument("stage", choices=list(STAGE_MODULES), help="sft, rm or ppo")
    keys.set_defaults(func=cmd_keys)

    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_parser(sub)
    return parser


# Modules exposing ``add_parser(subparsers)``, which registers commands that set ``func``.
# A command is listed only once its module exists.
COMMAND_MODULES = [
    "alignkit.judge.cli",  # judge serve
    "alignkit.rewards.score_cli",  # score
    "alignkit.export",  # export
    "alignkit.tools.infer",  # chat, predict
    "alignkit.tools.compare",  # compare
    "alignkit.tools.pairs",  # pairs
    "alignkit.report",  # report
    "alignkit.tools.demo",  # demo
    "alignkit.models.tiny_cli",  # tiny
    "alignkit.models.gguf_cli",  # convert
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
        # Raised inside peft/transformers for every LoRA model; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except user_errors() as err:
        if args.debug or args.verbose or os.environ.get("ALIGNKIT_DEBUG", "") not in ("", "0"):
            raise
        print(f"alignkit: error: {one_paragraph(err)}\n(run with --debug or ALIGNKIT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix (config, data, paths, the reward source): a message, no traceback."""
    from alignkit.config import ConfigError
    from alignkit.rewards.base import RewardError

    return (ConfigError, OSError, ValueError, RewardError)


def one_paragraph(err: BaseException) -> str:
    """The message on one paragraph: a multi-line one (the judge's request and reply) is joined."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())

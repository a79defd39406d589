"""``alignkit export`` on the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignkit.config import ConfigError
from alignkit.export.config import ExportConfig
from alignkit.export.merge import export_model
from alignkit.export.output import REPORT_FILE
from alignkit.tools.config import load_tool_config


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

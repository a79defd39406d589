"""Checks on a written export: shards/index, weight names, strict plain reload, architecture, logits
against the unmerged base + adapters, and an optional vLLM load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alignkit.data.templates import get_template
from alignkit.runs import ModelSpec

# Substrings no exported weight name may contain: heads and wrapper prefixes of training.
FORBIDDEN_KEY_PARTS = ("v_head", "summary", "score", "pretrained_model.", "base_model.model.", "lora_")

# Logit tolerance per dtype, relative to the reference logits' scale: max|diff| <= tol * max(1, max|logit|).
# fp32 differs only by summation order; half precision rounds the merged weights once more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
VERIFY_PROMPTS = ("Hello! Who are you?", "Write one sentence about the sea.", "What is 2 + 3?")


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


def weight_keys(out: Path, files: list[str]) -> list[str]:
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
    keys = weight_keys(out, files)
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

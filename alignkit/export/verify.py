"""Checks on a written export: shards/index, weight names, strict plain reload, architecture, logits
against the unmerged base + adapters, and an optional vLLM load."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from alignkit.data.templates import get_template
from alignkit.models.architectures import auto_class_for
from alignkit.runs import ModelSpec

# Substrings no exported weight name may contain: heads and wrapper prefixes of training.
# Training-only weights an export must not carry: value/score heads (whole dotted segments, so a
# base weight such as DeepSeek-V3's ``gate.e_score_correction_bias`` is not mistaken for one), peft
# wrappers' prefixes, unmerged LoRA factors.
FORBIDDEN_SEGMENTS = ("v_head", "summary", "score")
FORBIDDEN_KEY_PARTS = ("pretrained_model.", "base_model.model.", "lora_")


def forbidden_key(key: str) -> bool:
    return any(seg in FORBIDDEN_SEGMENTS for seg in key.split(".")) or any(p in key for p in FORBIDDEN_KEY_PARTS)

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

    model = auto_class_for(spec.base, trust_remote_code).from_pretrained(
        spec.base, dtype=dtype, trust_remote_code=trust_remote_code)
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
    bad = sorted(k for k in keys if forbidden_key(k))
    checks["weight_names"] = {"ok": not bad and bool(keys), "num_tensors": len(keys), "forbidden": bad[:10],
                              "forbidden_parts": list(FORBIDDEN_SEGMENTS + FORBIDDEN_KEY_PARTS)}

    loader = auto_class_for(out, trust_remote_code)  # causal LM, or image-text-to-text (Qwen3-VL)
    model, info = loader.from_pretrained(out, dtype=dtype, output_loading_info=True,
                                         trust_remote_code=trust_remote_code)
    info = {k: sorted(map(str, v)) for k, v in info.items() if v}
    checks["plain_load"] = {"ok": not info, "loader": f"{loader.__name__}.from_pretrained", **info}
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


# First-token log-prob tolerance (vLLM vs transformers, absolute) per dtype: fp32 differs only by
# kernels' summation order (~1e-5 measured on the tiny model); half precision rounds every matmul.
VLLM_LOGPROB_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}
VLLM_CHECK_NEW_TOKENS = 16


def vllm_check(out: Path) -> dict[str, Any]:
    """Load the export in vLLM and compare it with transformers on ``VERIFY_PROMPTS`` (rendered
    with the export's own chat template): greedy tokens, and the log-probs vLLM reports for the
    first response token (its top 5). Skipped, with the reason, only when vLLM is not importable;
    an architecture this vLLM build cannot run, or an engine that fails to load or run the export, is a
    failed check (``ok: false``) whose status says why, never a traceback."""
    from alignkit.generation.vllm_engine import CPU_KVCACHE_GB, INSTALL_HINT

    try:
        import vllm
    except ImportError as e:
        return {"status": f"skipped: no GPU/vLLM: vllm is not importable here ({e}); {INSTALL_HINT}"}
    archs = AutoConfig.from_pretrained(out).architectures or []
    if reason := vllm_unsupported(archs):
        return {"status": f"unsupported by this vLLM build: {reason}", "ok": False, "vllm_version": vllm.__version__}
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = [_vllm_check_prompt(tokenizer, p) for p in VERIFY_PROMPTS]
    want_tokens, want_logp, stop, dtype = _hf_greedy(out, tokenizer, prompts)
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GB)
    try:  # vLLM reports a failed load or a dead engine as many types; the engine's log holds the cause
        samples = _vllm_greedy(vllm, out, prompts, stop, dtype)
    except Exception as e:
        return {"status": f"failed: vLLM {vllm.__version__} could not load or run the export ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0]}); the vLLM log above has the cause", "ok": False,
                "vllm_version": vllm.__version__, "architectures": archs}
    return _compare(tokenizer, samples, want_tokens, want_logp, dtype) | {"vllm_version": vllm.__version__}


def _vllm_greedy(vllm, out: Path, prompts: list[list[int]], stop: list[int], dtype: torch.dtype) -> list:
    """vLLM's greedy completions of ``prompts`` (with the top-5 log-probs of each token), its engine
    shut down after."""
    llm = vllm.LLM(model=str(out), dtype=str(dtype).removeprefix("torch."), enforce_eager=True, seed=0,
                   max_model_len=max(len(p) for p in prompts) + VLLM_CHECK_NEW_TOKENS + 8,
                   **({"gpu_memory_utilization": 0.5} if torch.cuda.is_available() else {}))
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=VLLM_CHECK_NEW_TOKENS, stop_token_ids=stop,
                                     ignore_eos=True, logprobs=5)
        return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    finally:
        llm.llm_engine.engine_core.shutdown()


def vllm_unsupported(archs: list[str]) -> str | None:
    """Why this vLLM cannot run these architectures, or None. vLLM registers each model class by
    module and imports it only when loading; a module that does not import here (vLLM's Qwen3-VL
    needs torchvision, which a CPU vLLM environment may lack) fails deep inside the engine with
    "failed to be inspected", so it is imported here first to name the cause. An architecture vLLM
    does not register is not refused: vLLM may still run it through its transformers backend."""
    import importlib

    from vllm import ModelRegistry

    for arch in archs:
        module = getattr(ModelRegistry.models.get(arch), "module_name", None)
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            return f"{arch} is implemented in {module}, which does not import here ({type(e).__name__}: {e})"
    return None


def _compare(tokenizer, samples, want_tokens: list[list[int]], want_logp: list[torch.Tensor],
             dtype: torch.dtype) -> dict[str, Any]:
    """The check's verdict: vLLM's greedy tokens and first-token log-probs against transformers'."""
    got_tokens = [list(s.token_ids) for s in samples]
    diff = max(abs(lp.logprob - float(w[t])) for s, w in zip(samples, want_logp, strict=True) for t, lp in s.logprobs[0].items())
    tol = VLLM_LOGPROB_TOLERANCE.get(dtype, 1e-1)
    same = [g == w for g, w in zip(got_tokens, want_tokens, strict=True)]
    # Half precision may flip a near-tie late in a greedy run; its first token must still agree.
    tokens_ok = all(same) if dtype == torch.float32 else all(g[0] == w[0] for g, w in zip(got_tokens, want_tokens, strict=True))
    return {
        "status": "ran", "ok": tokens_ok and diff <= tol,
        "dtype": str(dtype).removeprefix("torch."), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "greedy_tokens_equal": f"{sum(same)}/{len(same)} prompts ({VLLM_CHECK_NEW_TOKENS} new tokens max)",
        "first_token_logprob_max_abs_diff": diff, "tolerance": tol,
        "mismatches": [{"prompt": VERIFY_PROMPTS[i], "vllm": got_tokens[i], "transformers": want_tokens[i]}
                       for i, ok in enumerate(same) if not ok],
        "samples": [tokenizer.decode(t, skip_special_tokens=True) for t in got_tokens],
    }


def _vllm_check_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids as a vLLM user would build them: the export's chat template, if it has one."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=tokenizer.chat_template is None)


def _hf_greedy(out: Path, tokenizer, prompts: list[list[int]]):
    """transformers' greedy tokens and first-token log-probs (V,), the stop ids, the dtype."""
    from alignkit.generation import stop_token_ids

    model = auto_class_for(out).from_pretrained(out, dtype="auto").eval()
    if torch.cuda.is_available():
        model.cuda()
    stop = stop_token_ids(tokenizer, None, model)
    tokens, logps = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            logps.append(model(ids).logits[0, -1].float().log_softmax(-1).cpu())
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=stop,
                                 max_new_tokens=VLLM_CHECK_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id or stop[0])
            tokens.append(gen[0, len(p):].tolist())
    return tokens, logps, stop, model.dtype

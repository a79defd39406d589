"""Sampling: responses with the KV cache, cut after EOS; stop tokens; decoding the text to score."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from alignkit.models.architectures import image_forward_kwargs, rope_positions

# Whether ``sample`` stops only when every rank's rows are finished (see ``synchronised_stop``).
_SYNC_STOP: ContextVar[bool] = ContextVar("alignkit_sync_stop", default=False)

# Called by an engine as soon as a row's response is finished (its stop token sampled): (row of the
# chunk, its response ids through that stop token). Rows that run to max_new_tokens are not
# reported; the caller takes them from the returned Rollout.
OnFinished = Callable[[int, list[int]], None]


@dataclass
class Rollout:
    """One chunk of sampled sequences. ``T = Q + R`` (left-padded query, right-padded response)."""

    input_ids: torch.Tensor  # (B, T) query + response tokens
    attention_mask: torch.Tensor  # (B, T) 1 on real query tokens and on kept response tokens
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    no_eos: torch.Tensor  # (B,) bool: the response hit max_new_tokens without EOS
    query_len: int  # Q
    # (B, R) engine's log-prob of each sampled token under the distribution it sampled from
    # (softmax of logits / temperature, renormalised over top-k/top-p); 0 off the response mask.
    # For the sync check only: losses always use the trainer's own forward pass. None: not computed.
    logprobs: torch.Tensor | None = None
    # The engine's own count of the weight syncs it had applied when it sampled (a worker process
    # sampling ahead; its sync check skips a stale batch). None: the engine samples the live weights.
    policy_version: int | None = None
    # A worker process's idle seconds before it started this rollout: waiting for the learner to ask
    # for it (``async/producer_wait_s``). None: an in-process engine, which the loop itself times.
    producer_wait_s: float | None = None


def first_eos_mask(response: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first EOS, and whether each row had an EOS.

    Computed from EOS positions rather than ``token != pad`` so a pad token equal to EOS (many
    base models) still gives the right mask.
    """
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device))  # (B, R)
    has_eos = is_eos.any(-1)
    # Number of EOS tokens strictly before each position; keep positions with none before.
    before = is_eos.long().cumsum(-1) - is_eos.long()
    return (before == 0).long(), ~has_eos


def prompt_token_lists(query_ids: torch.Tensor, query_mask: torch.Tensor) -> list[list[int]]:
    """(B, Q) left-padded prompts -> each row's prompt tokens, padding dropped (an engine's requests)."""
    return [row[m.bool()].tolist() for row, m in zip(query_ids.cpu(), query_mask.cpu(), strict=True)]


def request_seeds(n: int) -> list[int]:
    """Per-request seeds drawn from torch's RNG: a seeded (or resumed) run samples the same tokens
    however an engine batches or spreads the requests."""
    return torch.randint(0, 2**31 - 1, (n,)).tolist()


def rollout_from_tokens(query_ids: torch.Tensor, query_mask: torch.Tensor, tokens: list[list[int]],
                        logprobs: list[list[float]], eos_ids: list[int], pad_token_id: int) -> Rollout:
    """An engine's sampled tokens and their log-probs (one list per row) -> a ``Rollout`` with
    ``sample``'s conventions: response right-padded to the longest, tokens after the first EOS
    replaced by pad, mask up to and including the first EOS, log-probs zero off the mask."""
    B, R = len(tokens), max(len(t) for t in tokens)
    response = torch.full((B, R), pad_token_id, dtype=torch.long)  # (B, R)
    lps = torch.zeros(B, R)  # (B, R)
    for i, (toks, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        response[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        lps[i, : len(lp)] = torch.tensor(lp, dtype=torch.float)
    response_mask, no_eos = first_eos_mask(response, eos_ids)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, pad_token_id))
    device = query_ids.device
    return Rollout(
        input_ids=torch.cat([query_ids, response.to(device)], 1),
        attention_mask=torch.cat([query_mask, response_mask.to(device, query_mask.dtype)], 1),
        response_mask=response_mask.to(device),
        no_eos=no_eos.to(device),
        query_len=query_ids.shape[1],
        logprobs=(lps * response_mask).to(device),
    )


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering of (B, V) logits; removed entries become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p of the mass.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@contextmanager
def synchronised_stop() -> Iterator[None]:
    """Inside the block, ``sample`` keeps decoding until every rank of the default process group is
    done (one all-reduce per token), so all ranks run the same number of forwards: under FSDP a
    forward may hold collectives, and a rank that stopped early would leave the others waiting.
    Rows already finished keep receiving pad tokens, which the response mask drops."""
    token = _SYNC_STOP.set(True)
    try:
        yield
    finally:
        _SYNC_STOP.reset(token)


def all_finished(finished: torch.Tensor) -> bool:
    """Every row finished, on this rank or (under ``synchronised_stop``) on every rank."""
    done = finished.all()
    if _SYNC_STOP.get() and torch.distributed.is_initialized():
        done = done.to(torch.int32)
        torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
    return bool(done)


@functools.cache
def _forward_takes_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` where the model's class has it (transformers
    5.2x renamed it; ``past_key_values`` warns there on every call), else ``past_key_values``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's HF model
    return "cache" if _forward_takes_cache(type(inner)) else "past_key_values"


@torch.inference_mode()
def sample(model, pad_token_id: int, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int,
           temperature: float, top_k: int, top_p: float, eos_ids: list[int], pixels: dict | None = None,
           suppress_ids: tuple[int, ...] = (), with_logprobs: bool = False,
           on_finished: OnFinished | None = None) -> Rollout:
    """Batched sampling with a KV cache over a left-padded chunk of queries.

    A plain loop over the model's forward instead of ``generate``: on small models the
    per-token overhead of ``generate`` (processors, stopping criteria, cache plumbing) is
    larger than the forward itself. Positions come from the attention mask's cumulative sum,
    as in the training forward passes, so left padding does not shift them; with images
    (``pixels``: a Qwen-VL batch's ``pixel_values`` and ``image_grid_thw``), from the model's 3-D
    rope layout, and each new token continues after the prompt's largest position.
    ``suppress_ids`` are never sampled (a VL model's image placeholders: a sampled one would be
    taken for an image slot by every later forward). ``with_logprobs`` records each sampled
    token's log-prob under the distribution it was drawn from (for the sync check).
    ``on_finished`` hears of each row as it samples its stop token, so its scoring can start while
    the other rows decode; it draws no random numbers, so the samples are the same with or without.
    """
    from transformers import DynamicCache

    B, device = query_ids.shape[0], query_ids.device
    eos = torch.tensor(eos_ids, device=device)
    cache = {cache_kwarg(model): DynamicCache()}
    attn = query_mask
    position = rope_positions(model, query_ids, query_mask, (pixels or {}).get("image_grid_thw"))
    out = model(input_ids=query_ids, attention_mask=attn, position_ids=position, **cache,
                use_cache=True, logits_to_keep=1, **image_forward_kwargs(model, query_ids, pixels))
    # (B, 1): one past the prompt's largest position (text: its length; Qwen-VL: an image spans fewer)
    next_pos = position.amax(-1).reshape(-1, B).amax(0)[:, None] + 1
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float() / temperature
        if suppress_ids:
            logits[:, list(suppress_ids)] = float("-inf")
        logits = filter_logits(logits, top_k, top_p)  # (B, V)
        token = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        if with_logprobs:
            logps.append(logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
        tokens.append(token)
        newly = torch.isin(token, eos) & ~finished
        finished |= newly
        if on_finished is not None and newly.any():
            rows = newly.nonzero().squeeze(-1).tolist()
            for row, ids in zip(rows, torch.stack(tokens, 1)[rows].tolist(), strict=True):
                on_finished(row, ids)
        if len(tokens) == max_new_tokens or all_finished(finished):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        out = model(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos, **cache,
                    use_cache=True)
        next_pos = next_pos + 1
    response = torch.stack(tokens, 1)  # (B, R)
    response_mask, no_eos = first_eos_mask(response, eos_ids)
    # Tokens after the first EOS are replaced by pad so no later computation can see them.
    response = torch.where(response_mask.bool(), response, torch.full_like(response, pad_token_id))
    q = query_ids.shape[1]
    return Rollout(
        input_ids=torch.cat([query_ids, response], 1),
        attention_mask=torch.cat([query_mask, response_mask], 1),
        response_mask=response_mask,
        no_eos=no_eos,
        query_len=q,
        # 0 off the response mask (a forced pad after EOS may have had no probability at all)
        logprobs=torch.where(response_mask.bool(), torch.stack(logps, 1), 0.0) if with_logprobs else None,
    )


def decode_responses(tokenizer, rollout: Rollout, skip_special_tokens: bool = True) -> list[str]:
    """Response text without padding or (by default) special tokens such as the EOS."""
    resp = rollout.input_ids[:, rollout.query_len:]
    return [
        tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=skip_special_tokens)
        for row, m in zip(resp, rollout.response_mask, strict=True)
    ]


def stop_token_ids(tokenizer, template, model) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS, the template's end-of-turn token when it
    is a single token (``<|im_end|>``, ``<|eot_id|>``), and the model's own generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    eot = getattr(template, "eot", None)
    if eot:
        tid = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)

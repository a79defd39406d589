"""Rollout: sample responses with the KV cache, cut them after EOS, decode the text to score."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class Rollout:
    """One chunk of sampled sequences. ``T = Q + R`` (left-padded query, right-padded response)."""

    input_ids: torch.Tensor  # (B, T) query + response tokens
    attention_mask: torch.Tensor  # (B, T) 1 on real query tokens and on kept response tokens
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    no_eos: torch.Tensor  # (B,) bool: the response hit max_new_tokens without EOS
    query_len: int  # Q


def generation_config(tokenizer, eos_ids: list[int], max_new_tokens: int, temperature: float,
                      top_k: int, top_p: float) -> GenerationConfig:
    """An explicit config: a model's own generation_config (repetition penalty, top_k 20 ...)
    would make the sampling distribution differ from the one we compute log-probs under."""
    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k if top_k > 0 else None,
        top_p=top_p,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


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


@torch.no_grad()
def sample(model, tokenizer, query_ids: torch.Tensor, query_mask: torch.Tensor, gen_cfg: GenerationConfig,
           eos_ids: list[int]) -> Rollout:
    """One batched, left-padded ``generate`` over a chunk of queries."""
    out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_cfg)  # (B, Q+R')
    q = query_ids.shape[1]
    response = out[:, q:]
    response_mask, no_eos = first_eos_mask(response, eos_ids)
    # Tokens after the first EOS are replaced by pad so no later computation can see them.
    response = torch.where(response_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    return Rollout(
        input_ids=torch.cat([query_ids, response], 1),
        attention_mask=torch.cat([query_mask, response_mask], 1),
        response_mask=response_mask,
        no_eos=no_eos,
        query_len=q,
    )


def decode_responses(tokenizer, rollout: Rollout, skip_special_tokens: bool = True) -> list[str]:
    """Response text without padding or (by default) special tokens such as the EOS."""
    resp = rollout.input_ids[:, rollout.query_len:]
    return [
        tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=skip_special_tokens)
        for row, m in zip(resp, rollout.response_mask)
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

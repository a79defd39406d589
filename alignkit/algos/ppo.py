"""PPO with a value head: GAE, loss aggregation, the clipped value loss, explained variance.

The policy losses (PPO's clipped one, GSPO, CISPO) are in ``alignkit.algos.losses``.

All (B, T) tensors are response tokens with right padding described by ``mask``.
"""

from __future__ import annotations

import torch

from alignkit.algos.normalize import masked_mean, masked_var


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): ``(advantages, returns)``, (B, T).

    rewards, values, mask: (B, T). returns = advantages + values. The episode ends at each
    row's last real token, so the bootstrap value after it is 0: padding is zeroed before the
    backward recursion, otherwise the value head's output on padding would leak into the
    last real token's advantage. Whitening is a separate ``masked_whiten`` call.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    lastgaelam = torch.zeros_like(values[:, 0])
    next_values = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
        next_values = values[:, t]
    return advantages, (advantages + values) * mask


LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate_loss(losses: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", max_len: int | None = None
                   ) -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar.

    ``token_mean``: mean over every real token of the batch (long responses weigh more; DAPO's
    token-level loss, Yu et al. 2025 sec. 3.3). ``seq_mean_token_mean``: mean per response, then
    over responses (the original GRPO, Shao et al. 2024 eq. 3). ``seq_mean_token_sum_norm``: sum
    per response divided by a constant ``max_len``, then the mean over responses (Dr. GRPO, Liu et
    al. 2025 sec. 3.1: no per-response length normalisation, so no length bias).
    """
    if mode == "token_mean":
        return masked_mean(losses, mask)
    rows = mask.sum(1) > 0  # responses with a real token
    if mode == "seq_mean_token_mean":
        per_seq = masked_mean(losses, mask, dim=1)
    elif mode == "seq_mean_token_sum_norm":
        per_seq = (losses * mask.to(losses.dtype)).sum(1) / (max_len or losses.shape[1])
    else:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}")
    return per_seq[rows].sum() / rows.sum().clamp(min=1)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)², (v_clip - R)²) over real tokens.

    values (with grad), old_values, returns, mask: (B, T); v_clip keeps the new prediction
    within ±cliprange_value of the rollout-time one (Huang et al. 2022, "The 37 Implementation
    Details of PPO", value function loss clipping; kept by Ziegler et al. 2019's code). Returns ``(loss, stats)`` with detached scalar ``clipfrac``.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses = (values - returns).square()
    vf_losses_clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)}
    return loss, stats


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over real tokens, scalar; NaN if Var(returns) = 0.

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse (cleanrl).
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    explained = 1 - masked_var(returns - values, mask, unbiased=False) / var_returns
    return torch.where(var_returns == 0, torch.nan, explained)

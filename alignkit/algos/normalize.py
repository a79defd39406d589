"""Statistics over the real (mask == 1) tokens of right-padded (B, T) tensors."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    x, mask: (B, T). ``dim=None`` gives a scalar over all real tokens (TRL's token-level
    average); ``dim=1`` gives one mean per row, (B,). A row or batch with no real token
    gives 0 rather than NaN, so one empty row cannot poison a whole update.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance (scalar) of ``x`` over real tokens; x, mask: (B, T).

    ``unbiased`` applies Bessel's correction n / (n - 1), which needs at least two real tokens.
    """
    mask = mask.to(x.dtype)
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 real tokens, got {int(n)}; "
                "use a larger batch or unbiased=False"
            )
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over real tokens.

    x, mask: (B, T) -> (B, T), padding positions set to 0. Advantages are whitened with the
    mean shifted; rewards with ``shift_mean=False`` (TRL / lm-human-preferences), because
    subtracting the mean would add a constant reward per token and so bias response length.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)

"""Math that several variants share, so each variant file keeps only what is its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def low_rank_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B A x`` in ``x``'s dtype: ``a`` is ``(r, d_in)``, ``b`` is ``(d_out, r)``.

    The small factors are cast to the activation dtype (a no-op when they match), never
    the activations, and the scale multiplies the r-wide intermediate rather than the
    d_out-wide result.
    """
    return F.linear(F.linear(x, a.to(x.dtype)) * scale, b.to(x.dtype))

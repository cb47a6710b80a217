"""Math that several variants share, so each variant file keeps only what is its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def low_rank_update(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, y: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * B A x`` in ``x``'s dtype, or ``y + scale * B A x`` when ``y`` is given.

    ``a`` is ``(r, d_in)``, ``b`` is ``(d_out, r)``. The small factors are cast to the
    activation dtype only when they differ (never the activations). With ``y`` the scale
    and the add are one ``torch.add(..., alpha=scale)``: no python-float multiply, which
    costs a whole extra op (a wrapped-scalar tensor) per call; measured at half the cost
    of ``y + F.linear(F.linear(x, a) * scale, b)`` on small inputs. Without ``y`` the
    scale multiplies the r-wide intermediate rather than the d_out-wide result.
    """
    dt = x.dtype
    if a.dtype != dt:
        a = a.to(dt)
    if b.dtype != dt:
        b = b.to(dt)
    if y is None:
        return F.linear(F.linear(x, a) * scale, b)
    return torch.add(y, F.linear(F.linear(x, a), b), alpha=scale)

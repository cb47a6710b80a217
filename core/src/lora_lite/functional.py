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


def offset_low_rank_specs(d_in: int, d_out: int, r: int) -> dict:
    """The tensors of :func:`offset_low_rank_update`: trainable ``lora_A`` (r, d_in) and
    ``lora_B`` (d_out, r), frozen saved copies ``lora_A0``/``lora_B0`` of their start, all
    zeros until ``group_init`` writes the calibrated start into both pairs."""
    from .params import ParamSpec

    return {
        "lora_A": ParamSpec((r, d_in), init="zeros"),
        "lora_B": ParamSpec((d_out, r), init="zeros"),
        "lora_A0": ParamSpec((r, d_in), init="zeros", trainable=False),
        "lora_B0": ParamSpec((d_out, r), init="zeros", trainable=False),
    }


def offset_low_rank_update(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scale: float,
    y: torch.Tensor,
) -> torch.Tensor:
    """``y + scale (B A - B0 A0) x``: a LoRA whose non-zero start ``B0 A0`` is subtracted
    (so the adapter starts as the identity without rewriting the base weight; CorDA,
    LoRA-GA). Computed as ONE rank-``2r`` product, two matmuls instead of four, using
    ``B A - B0 A0 = (B - B0) A + B0 (A - A0)``: ``[B - B0, B0] ([A; A - A0] x)``. At init
    ``B - B0`` and ``A - A0`` are exact zeros, so the delta is exactly zero (identity bit for
    bit). Factors are cast to ``x``'s dtype only when they differ."""
    dt = x.dtype
    if a.dtype != dt:
        a, b, a0, b0 = a.to(dt), b.to(dt), a0.to(dt), b0.to(dt)
    delta = F.linear(F.linear(x, torch.cat((a, a - a0))), torch.cat((b - b0, b0), dim=1))
    return torch.add(y, delta, alpha=scale)


def offset_low_rank_merge(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scale: float,
) -> torch.Tensor:
    """``W + scale (B A - B0 A0)`` in float32: the merged weight of :func:`offset_low_rank_update`."""
    w = torch.addmm(weight, b.float(), a.float(), alpha=scale)
    return torch.addmm(w, b0.float(), a0.float(), alpha=-scale)


def offset_low_rank_as_lora(layer, cfg, tensors: dict) -> tuple[dict, int, float]:
    """A ``PeftFormat`` ``convert`` for :func:`offset_low_rank_update` variants (CorDA,
    LoRA-GA): the rank-``2r`` PEFT LoRA of the adapter's delta against the original (never
    rewritten) weight, as PEFT's ``path_initial_model_for_weight_conversion`` writes it:
    ``s (B A - B0 A0) = s [B, -B0] [A; A0]``, so ``A' = [A; A0]``, ``B' = [B, -B0]``,
    ``alpha' = 2 alpha`` (the same scale). Exact: the saved factors, concatenated."""
    from .checkpoint import _full_cpu

    a0 = _full_cpu(layer.lora_A0).to(tensors["lora_A"].dtype)
    b0 = _full_cpu(layer.lora_B0).to(tensors["lora_B"].dtype)
    return ({"lora_A": torch.cat([tensors["lora_A"], a0]), "lora_B": torch.cat([tensors["lora_B"], -b0], dim=1)},
            2 * cfg.r, 2 * cfg.alpha)

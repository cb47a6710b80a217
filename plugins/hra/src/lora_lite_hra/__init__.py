"""HRA: Householder reflection adaptation (Yuan et al. 2024, https://arxiv.org/abs/2405.17484).

With ``u_1 .. u_r`` the columns of ``U`` (d_in, r) and ``v_i = u_i / ||u_i||``, the frozen
layer sees a rotated input::

    y' = W H x (+ b),     H = (I - 2 v_1 v_1^T) (I - 2 v_2 v_2^T) ... (I - 2 v_r v_r^T)

as PEFT's ``HRALinear`` computes it (``F.linear(x, W @ H)``). ``H`` is applied in its
compact WY form ``H = I - V T V^T`` with ``T = (I/2 + striu(V^T V))^{-1}`` (r x r, upper
triangular; Joffrain et al. 2006), so the hook does two r-wide matmuls on the activation
(``x - (x V)(V T)^T``) and keeps one copy of ``x`` plus the r-wide ``x V`` for backward,
instead of r reflected copies or a (d_in x d_in) matrix.

Identity at init: as PEFT, ``U`` is drawn kaiming-uniform (a=sqrt(5)) at shape (d_in, r/2),
so with fan-in r/2 each entry is uniform in +-sqrt(2/r), and each column is repeated
twice. Equal neighbours give ``(I - 2 v v^T)^2 = I``, so ``H = I`` exactly and ``y' = y``;
``r`` must therefore be even. Gradients of a pair differ (one acts before, one after
the other), so the pair splits on the first step. ``U`` is stored in fp32 whatever
``cfg.dtype``: the reflections only see its direction, entries are ~sqrt(2/r), and bf16
(spacing 2^-8 near 0.5) rounds lr-1e-4 updates of most entries to nothing.

Not implemented: PEFT's ``apply_GS`` (Gram-Schmidt on ``U``, ``H = I - 2 Q Q^T``): it
reflects an r-dimensional subspace, so it is never the identity, and with PEFT's paired
init the second vector of each pair is Gram-Schmidt of rounding noise.

Layers: any linear-like layer lora-lite targets, ``nn.Linear`` and bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` included: HRA only transforms the input, it never reads the weight.
The layer only has to take ``(..., d_in)`` inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll


def _paired_kaiming(data: torch.Tensor) -> None:
    half = torch.empty(data.shape[0], data.shape[1] // 2)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    data.copy_(half.repeat_interleave(2, dim=1))


def householder_wy(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, V T)`` with ``H = I - V T V^T`` the product of the reflections along ``u``'s columns."""
    v = u / u.norm(dim=0)
    eye = torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
    t_inv = torch.triu(v.T @ v, diagonal=1) + 0.5 * eye
    return v, v @ torch.linalg.solve_triangular(t_inv, eye, upper=True)


class HRA:
    name = "hra"
    lrs = (3e-4, 1e-3, 3e-3, 1e-2)  # rotations: fewer effective degrees of freedom than LoRA's r (d_in + d_out)
    peft = ll.PeftFormat({"lora_U": "hra_u"}, {"apply_GS": False, "bias": "none"}, peft_type="HRA",
                         config_fields={"r": "r"}, neutral=("init_weights",))

    def param_specs(d_in, d_out, cfg):
        if cfg.r % 2:
            raise ll.ConfigError(
                f"hra needs an even r: its reflections start as equal pairs that cancel (H H = I), which is what "
                f"makes the adapter start as the identity; got r={cfg.r}. Use r={cfg.r + 1} or r={cfg.r - 1 or 2}."
            )
        return {"lora_U": ll.ParamSpec((d_in, cfg.r), init=_paired_kaiming, keep_fp32=True)}

    def forward_input(layer, x):
        # the r x r solve is done in (at least) fp32, then only the small factors are cast
        u = layer.lora_U.to(torch.promote_types(x.dtype, torch.float32))
        v, vt = householder_wy(u)
        # the minus sign sits on the small factor: backward then passes dL/dx' to x unchanged
        # instead of negating an activation-sized gradient
        return x + F.linear(F.linear(x, v.T.to(x.dtype)), vt.neg().to(x.dtype))

    def merge(layer, weight, bias):
        # the input transform is linear, x' = x F with F = forward_input(I): W' = W F^T
        eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        return weight @ HRA.forward_input(layer, eye).T, bias

"""GOFT and qGOFT: orthogonal finetuning with Givens rotations (Ma, Chu, Yang, Lin, Gao, Zhao
2024, "Parameter Efficient Quasi-Orthogonal Fine-Tuning via Givens Rotation", ICML 2024,
https://arxiv.org/abs/2404.04316).

The frozen layer sees a rotated (and, optionally, rescaled) input, a pre-hook::

    y' = W (sigma * (R x)) + b,      R = G_L ... G_2 G_1

Each stage ``G_l`` is a set of disjoint Givens rotations acting in parallel. The ``d = d_in``
coordinates start active; stage l pairs the active coordinates two by two, in order
(``(0, 1), (2, 3), ...`` then ``(0, 2), (4, 6), ...`` then ``(0, 4), ...``), rotates each
pair, and keeps the first of each pair (and an odd one out) active for the next stage, until
one is left. That is ``d - 1`` rotations in ``L = ceil(log2 d)`` stages: the paper's parallel
arrangement of O(d) Givens rotations, enough to turn any vector to any direction, at O(d)
parameters and O(log d) sparse steps. A pair ``(p, q)`` is rotated as the column vector::

    [x_p', x_q'] = B [x_p, x_q],     B = [[cos t, -sin t], [sin t, cos t]]   (GOFT, strict_oft)
                                     B = [[a, b], [c, d]], free              (qGOFT, quasi-Givens)

With ``strict_oft`` the angle is ``t = pi * tanh(phi)`` of a trainable ``phi`` (the authors'
released code; it keeps ``t`` in (-pi, pi)); otherwise each block is a free 2x2 matrix,
the paper's quasi-Givens rotation that can also change norms and angles a little. ``sigma``
(``d_in``, trainable, unless ``no_scaling``) rescales each input coordinate after the
rotation: ``W diag(sigma)`` rescales the weight's columns, the authors' "length" scaler.
``ortho_reg`` > 0 adds ``ortho_reg * sum ||B^T B - I||_F^2`` over the quasi-Givens blocks to
the loss (``lora_lite.regularization_loss``), a soft pull back to orthogonality; 0 by default.

Identity at init: ``phi = 0`` (so ``cos t = 1``, ``sin t = 0``), quasi-Givens blocks ``= I``,
``sigma = 1``: every stage is the identity exactly and ``y' = y`` bit for bit. Gradients are
not zero: ``d(x_p')/dt = -x_q`` at ``t = 0``.

Not implemented: the released code's ``fast_config`` and ``beta`` (unused there), and its
"Hadamard multiplier" forward (v2), whose strided stages do not rotate the pairs the angles
are stored for (for steps > 1 it mixes neighbours 1 apart); the paper's stage structure above
is what is computed here, checked against dense float64 rotations. No PEFT implementation
exists, so there is no ``PeftFormat``. ``r`` and ``alpha`` are not used.

Layers: any linear-like layer lora-lite targets, ``nn.Linear``, transformers ``Conv1D`` and
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` included: GOFT only transforms the input and
never reads the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

import lora_lite as ll


@dataclass
class GOFTConfig(ll.LoraLiteConfig):
    variant: str = "goft"
    strict_oft: bool = True
    no_scaling: bool = False
    ortho_reg: float = 0.0

    r_min: ClassVar[int] = 0

    def validate(self):
        if self.ortho_reg < 0:
            raise ll.ConfigError(f"goft ortho_reg must be >= 0, got {self.ortho_reg}.")
        if self.ortho_reg and self.strict_oft:
            raise ll.ConfigError(
                "goft ortho_reg penalises non-orthogonal quasi-Givens blocks; with strict_oft=True every block is an "
                "exact rotation, so the term is always 0. Set strict_oft=False (qGOFT) or ortho_reg=0."
            )


def stages(d: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(p, q), ...]``: the coordinate pairs each stage rotates, ``d - 1`` pairs in all."""
    out, step, active = [], 1, d
    while active > 1:
        pairs = active // 2
        p = torch.arange(pairs) * 2 * step
        out.append((p, p + step))
        active = pairs + active % 2
        step *= 2
    return out


class GOFT:
    name = "goft"
    size_knob = None  # d_in - 1 angles (+ d_in scales): the layer shapes fix the size
    lrs = (3e-4, 1e-3, 3e-3, 1e-2)
    config_class = GOFTConfig

    def param_specs(d_in, d_out, cfg):
        if d_in < 2:
            raise ll.ConfigError(f"goft needs d_in >= 2 to rotate anything, got a layer with d_in={d_in}.")
        specs = {}
        if cfg.strict_oft:
            specs["lora_theta"] = ll.ParamSpec((d_in - 1,), init="zeros")
        else:
            eye = lambda t: t.copy_(torch.eye(2).expand(d_in - 1, 2, 2))  # noqa: E731
            # blocks near 1.0: bf16 spacing there (2^-7) would freeze them
            specs["lora_G"] = ll.ParamSpec((d_in - 1, 2, 2), init=eye, keep_fp32=True)
        if not cfg.no_scaling:
            specs["lora_scale"] = ll.ParamSpec((d_in,), init="ones", keep_fp32=True)
        return specs

    def init(layer, cfg):
        d_in = (layer.lora_theta if cfg.strict_oft else layer.lora_G).shape[0] + 1
        pairs = stages(d_in)
        device = layer.weight.device
        # per stage: the indices it writes (p then q), and where its blocks start in the parameter
        layer.register_buffer("lora_pq", torch.cat([torch.cat([p, q]) for p, q in pairs]).to(device), persistent=False)
        layer.lora_counts = tuple(len(p) for p, _ in pairs)
        layer.lora_strict, layer.lora_scaled = cfg.strict_oft, not cfg.no_scaling

    def forward_input(layer, x):
        compute = torch.promote_types(x.dtype, torch.float32)
        if layer.lora_strict:
            angle = torch.tanh(layer.lora_theta.to(compute)) * math.pi
            cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
            a, b, c, d = cos, -sin, sin, cos
        else:
            g = layer.lora_G if layer.lora_G.dtype == x.dtype else layer.lora_G.to(x.dtype)
            a, b, c, d = g[:, 0, 0], g[:, 0, 1], g[:, 1, 0], g[:, 1, 1]
        z = x.reshape(-1, x.shape[-1])
        start = 0
        for n in layer.lora_counts:  # ceil(log2 d_in) stages, each a batch of disjoint rotations
            pq = layer.lora_pq[2 * start:2 * (start + n)]
            xp, xq = z[:, pq[:n]], z[:, pq[n:]]
            s = slice(start, start + n)
            new = torch.cat([xp * a[s] + xq * b[s], xp * c[s] + xq * d[s]], dim=1)
            z = z.index_copy(1, pq, new)
            start += n
        if layer.lora_scaled:
            scale = layer.lora_scale
            z = z * (scale if scale.dtype == x.dtype else scale.to(x.dtype))
        return z.reshape(x.shape)

    def merge(layer, weight, bias):
        # x' = x F (rows) with F = forward_input(I) = R^T diag(sigma): W' = W F^T = W diag(sigma) R
        eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        return weight @ GOFT.forward_input(layer, eye).T, bias

    def regularization_loss(targets, cfg):
        if not cfg.ortho_reg or cfg.strict_oft:
            return None
        total = 0.0
        for t in targets:
            g = t.layer.lora_G
            gram = g.transpose(1, 2) @ g
            total = total + (gram - torch.eye(2, dtype=g.dtype, device=g.device)).pow(2).sum()
        return cfg.ortho_reg * total

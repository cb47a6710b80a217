"""ETHER and ETHER+: finetuning with hyperplane reflections (Bini, Roth, Akata, Khoreva 2024,
"ETHER: Efficient Finetuning of Large-Scale Models with Hyperplane Reflections", ICML 2024,
https://arxiv.org/abs/2405.20271).

The input is split into ``nb`` blocks of size ``b = d_in / nb``; block k is transformed by its
own ``H_k`` before the frozen layer sees it (a pre-hook; ``W' = W diag(H_1..H_nb)``, which is
how the authors' code applies it)::

    ETHER  (ether_plus=False):  H = I - 2 u u^T / |u|^2                    (a reflection)
    ETHER+ (ether_plus=True):   H = I - u u^T / |u|^2 + v v^T / |v|^2      (the relaxed form)

``two_sided`` (ETHER+ with a transform on both sides, the authors' ``etherplusHH``) adds an
output-side ``H'`` from a second pair on blocks of ``d_out / nb``: ``W' = H' W H``, so
``y' = H' (y - b) + b`` (a post-hook; the bias is not transformed, as in the authors' code).
``flip_side`` moves the one-sided transform to the output side instead (their ``flip_side``).

Each ``H`` differs from ``I`` by a rank-1 (ETHER) or rank-2 (ETHER+) term, so the hooks apply
it as ``z + (z V)(V C)^T`` per block (autograd keeps ``z`` and the k-wide ``z V``), ``V`` the unit vectors and ``C`` the signs
(``-2``; ``-1, +1``): two thin batched matmuls on the activation, ``H`` is never built.

Identity at init. ETHER is a reflection: ``|H - I|_F = 2`` for every ``u``, so it can never
start at (or reach) the identity; the paper initialises ``u`` at random and the model starts
reflected. ETHER+ starts at the identity as in the authors' code: ``u`` is drawn
kaiming-uniform (a=sqrt(5)) and ``v = -u``, so ``v v^T = u u^T``, the two terms cancel and
``y' = y`` up to float rounding (the matmul's fused multiply-adds leave ~1e-7 of the two
cancelling terms in fp32: 3.6e-7 on the toy model); the two vectors then get different gradients and split. That is why
``ether_plus=True`` is the default here: the conformance kit (and ``lora_lite.attach``'s
promise of an unchanged model at attach) needs the identity. Plain ETHER is available as
``ether_plus=False`` with the paper's reflected start, documented as not identity at init.

The vectors are stored in fp32 whatever ``cfg.dtype``: only their directions act, entries are
~1/sqrt(b), and bf16 storage rounds small optimizer steps of them to nothing (as HRA's).

Not implemented: the authors' ``ether_dropout`` (input dropout, off in their configs) and
their ``oft`` block type (lora-lite has ``oft``). No PEFT implementation exists, so there is
no ``PeftFormat``; parity is against a dense float64 reference of the equations. ``r`` and
``alpha`` are not used.

Layers: any linear-like layer lora-lite targets, ``nn.Linear``, transformers ``Conv1D`` and
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` included: ETHER transforms activations only,
never reading the weight (the output side reads the bias, to leave it untransformed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import lora_lite as ll


@dataclass
class ETHERConfig(ll.LoraLiteConfig):
    variant: str = "ether"
    nb: int = 1
    ether_plus: bool = True
    two_sided: bool = False
    flip_side: bool = False

    r_min: ClassVar[int] = 0

    def validate(self):
        if self.nb < 1:
            raise ll.ConfigError(f"ether nb (diagonal blocks per layer) must be >= 1, got {self.nb}.")
        if self.two_sided and not self.ether_plus:
            raise ll.ConfigError(
                "ether two_sided is the authors' ETHER+ form (etherplusHH); set ether_plus=True, or two_sided=False "
                "for plain ETHER."
            )
        if self.two_sided and self.flip_side:
            raise ll.ConfigError("ether two_sided already transforms both sides; flip_side would be redundant.")


def _kaiming_vectors(paired: bool):
    def fill(data: torch.Tensor) -> None:
        nb = data.shape[-2]
        u = torch.empty(nb, data.shape[-1])
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        data.copy_(torch.stack([u, -u]) if paired else u[None])
    return fill


def _side_spec(width: int, cfg, side: str) -> ll.ParamSpec:
    if width % cfg.nb:
        raise ll.ConfigError(f"ether: the {side} width {width} is not divisible by nb={cfg.nb}.")
    if width // cfg.nb < 2:
        raise ll.ConfigError(f"ether: blocks of size 1 on the {side} side (width {width}, nb={cfg.nb}) cannot reflect.")
    # (1, nb, b): u (ETHER) or (2, nb, b): u and v = -u (ETHER+)
    k = 2 if cfg.ether_plus else 1
    return ll.ParamSpec((k, cfg.nb, width // cfg.nb), init=_kaiming_vectors(cfg.ether_plus), keep_fp32=True)


def householder_update(z: torch.Tensor, vecs: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``z H^T`` per block (rows), ``H = I + sum_j c_j v_j v_j^T / |v_j|^2``; ``shift`` is subtracted
    from ``z`` inside the update only (``H (z - shift) + shift``)."""
    k, nb, b = vecs.shape
    unit = vecs.to(torch.promote_types(z.dtype, torch.float32))
    unit = unit / unit.norm(dim=-1, keepdim=True)
    signs = unit.new_tensor([-2.0] if k == 1 else [-1.0, 1.0]).view(k, 1, 1)
    v = unit.permute(1, 2, 0).to(z.dtype)  # (nb, b, k)
    vc = (unit * signs).permute(1, 0, 2).to(z.dtype)  # (nb, k, b)
    blocks = z.reshape(-1, nb, b).transpose(0, 1)  # (nb, tokens, b)
    proj = torch.bmm(blocks, v)  # (nb, tokens, k)
    if shift is not None:
        proj = proj - torch.bmm(shift.reshape(nb, 1, b).to(z.dtype), v)
    return torch.baddbmm(blocks, proj, vc).transpose(0, 1).reshape(z.shape)


class ETHER:
    name = "ether"
    size_knob = None  # one (ETHER+: two) d-long vectors per side whatever nb is: the layer shapes fix the size
    lrs = (3e-4, 1e-3, 3e-3, 1e-2)
    config_class = ETHERConfig

    def param_specs(d_in, d_out, cfg):
        specs = {}
        if not cfg.flip_side:
            specs["lora_in"] = _side_spec(d_in, cfg, "input")
        if cfg.flip_side or cfg.two_sided:
            specs["lora_out"] = _side_spec(d_out, cfg, "output")
        return specs

    def forward_input(layer, x):
        if "lora_in" not in layer._parameters:
            return x
        return householder_update(x, layer.lora_in)

    def forward(layer, x, y):
        if "lora_out" not in layer._parameters:
            return y
        bias = layer.bias
        return householder_update(y, layer.lora_out, None if bias is None else bias.detach())

    def merge(layer, weight, bias):
        # input side: W' = W H^T (H symmetric); output side: W' = H' W, bias untouched
        if "lora_in" in layer._parameters:
            weight = householder_update(weight, layer.lora_in)
        if "lora_out" in layer._parameters:
            weight = householder_update(weight.T.contiguous(), layer.lora_out).T
        return weight, bias

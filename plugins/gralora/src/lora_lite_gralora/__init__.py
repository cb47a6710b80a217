"""GraLoRA: granular low-rank adaptation (Jung et al. 2025, https://arxiv.org/abs/2505.20355),
as PEFT 0.21's ``GraloraConfig`` computes it.

The weight is cut into ``k x k`` sub-blocks (``k = gralora_k``; block ``(j, n)`` maps input
slice ``n`` to output slice ``j``), and each sub-block gets its own rank-``s`` LoRA pair,
``s = r / k``::

    delta_{j, n} = B_{j, n} A_{n, j},     A_{n, j}: (s, d_in / k),   B_{j, n}: (d_out / k, s)
    y' = y + alpha / (r + hybrid_r) * (delta x  +  B_h A_h x)

The ``k^2`` pairs are stored packed as PEFT stores them: ``lora_A`` (k, d_in/k, r) holds, for
input slice ``n``, the ``k`` A's side by side (columns ``j s .. (j+1) s`` feed output slice
``j``); ``lora_B`` (k, r, d_out/k) holds, for output slice ``j``, the ``k`` B's stacked (rows
``n s .. (n+1) s`` come from input slice ``n``). The trainable count is a rank-r LoRA's,
``r (d_in + d_out)``, while ``delta`` can reach rank ``k r``. The optional hybrid part
(``hybrid_r > 0``) is a plain LoRA pair ``A_h`` (hybrid_r, d_in), ``B_h`` (d_out, hybrid_r)
added on top, sharing the scale.

Identity at init: every ``B`` (and ``B_h``) is zero, so the update is exactly zero; the
``A``'s are kaiming-uniform (a=sqrt(5)) drawn per input slice at shape (r, d_in/k), as PEFT
draws them (same RNG stream, same numbers; for the hybrid pair PEFT's two throw-away
``nn.Linear`` draws are repeated too), so ``B``'s gradient is non-zero at init.

Layers: any linear-like layer, ``nn.Linear``, transformers ``Conv1D`` and bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` included: GraLoRA never reads the weight. ``k`` has to
divide ``r``, ``d_in`` and ``d_out``; where it does not, that layer uses the largest
``k' < k`` that does, with a warning (PEFT raises; lora-lite's OFT adapts its block size the
same way), so a config fits every layer and the numbers equal PEFT's wherever PEFT runs.

PEFT format (``ll.export_peft`` / ``ll.import_peft``): PEFT's ``GRALORA`` adapter, ``lora_A`` /
``lora_B`` as ``gralora_A`` / ``gralora_B`` (the same packed layouts, copied bit for bit);
``r``, ``alpha`` and ``gralora_k`` under the same names. Only ``hybrid_r=0``: PEFT's hybrid pair
(``gralora_A_general.weight`` / ``gralora_B_general.weight``) exists only when ``hybrid_r > 0``
and lora-lite's ``PeftFormat`` maps one fixed set of tensors per variant, so export refuses an
attachment with ``hybrid_r > 0`` and import refuses a file with it (a core extension, optional
tensors, would lift this). Export also refuses a layer on a fallback ``k'`` (PEFT raises
there); import refuses ``bias`` other than ``"none"``, ``fan_in_fan_out`` and anything else
it does not model; ``gralora_dropout`` and ``init_weights`` are accepted whatever their value.

Not implemented from PEFT: ``gralora_dropout`` (lora-lite variants take no dropout) and
``init_weights=False`` (random ``B``: a testing switch that does not start at the base model).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import lora_lite as ll


@dataclass
class GraloraConfig(ll.LoraLiteConfig):
    """``gralora_k``: sub-blocks per side (PEFT's default 2; r must be a multiple);
    ``hybrid_r``: rank of the extra plain LoRA pair (0: none)."""

    variant: str = "gralora"
    gralora_k: int = 2
    hybrid_r: int = 0

    def validate(self):
        if self.gralora_k < 1:
            raise ll.ConfigError(f"gralora gralora_k must be a positive integer, got {self.gralora_k}.")
        if self.hybrid_r < 0:
            raise ll.ConfigError(f"gralora hybrid_r must be >= 0 (0: no hybrid LoRA part), got {self.hybrid_r}.")


def _per_slice_kaiming(data: torch.Tensor) -> None:
    """PEFT's draw: one kaiming-uniform (r, d_in/k) A per input slice, stored transposed."""
    for n in range(data.shape[0]):
        a = torch.empty(data.shape[2], data.shape[1])
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        data[n].copy_(a.T)


def _hybrid_kaiming(d_out: int):
    def fill(data: torch.Tensor) -> None:
        # PEFT builds nn.Linear(d_in, h) and nn.Linear(h, d_out) (each constructor draws its
        # weight) and then redraws A: the same three draws keep the RNG stream in step
        nn.init.kaiming_uniform_(torch.empty(data.shape), a=math.sqrt(5))
        nn.init.kaiming_uniform_(torch.empty(d_out, data.shape[0]), a=math.sqrt(5))
        a = torch.empty(data.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        data.copy_(a)

    return fill


def block_count(k: int, r: int, d_in: int, d_out: int) -> int:
    """The largest ``k' <= k`` dividing ``r``, ``d_in`` and ``d_out``; warns when it is not ``k``."""
    g = math.gcd(r, d_in, d_out)
    got = max(c for c in range(1, k + 1) if g % c == 0)
    if got != k:
        warnings.warn(
            f"gralora gralora_k={k} does not divide d_in={d_in}, d_out={d_out} and r={r} all; using "
            f"{got} x {got} sub-blocks on this layer (PEFT raises instead).",
            stacklevel=2,
        )
    return got


def block_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``delta x`` (unscaled) for packed ``a`` (k, d_in/k, r) and ``b`` (k, r, d_out/k)."""
    k, r = a.shape[0], a.shape[2]
    h = torch.einsum("...ni,nir->...nr", x.unflatten(-1, (k, -1)), a)  # (..., input slice n, r)
    # route column group j of slice n to output slice j: (..., j, n * s)
    h = h.unflatten(-1, (k, r // k)).transpose(-3, -2).flatten(-2)
    return torch.einsum("...jr,jro->...jo", h, b).flatten(-2)


def _to_peft(layer, cfg, t):
    """Export: the packed tensors as they are; no hybrid pair, no fallback block count."""
    if cfg.hybrid_r:
        raise ll.PeftInteropError(
            f"gralora hybrid_r={cfg.hybrid_r}: lora-lite's PEFT format maps gralora_A / gralora_B only (PEFT's "
            "gralora_A_general / gralora_B_general exist only with hybrid_r > 0, which the format cannot "
            "declare); export an attachment with hybrid_r=0."
        )
    k = t["lora_A"].shape[0]
    if k != cfg.gralora_k:
        raise ll.PeftInteropError(
            f"gralora gralora_k={cfg.gralora_k} does not divide a target's widths and r, which uses {k} x {k} "
            "sub-blocks; PEFT raises on such a layer. Attach with a gralora_k dividing every target's widths."
        )
    return t, cfg.r, cfg.alpha


class GraLoRA:
    name = "gralora"
    additive = True  # y + delta(x): rows of a batch may use different attachments
    config_class = GraloraConfig
    size_knob = "r"  # r (d_in + d_out) trainable numbers per target, as LoRA, whatever k
    # PEFT's GraLoRA: the same packed tensors; its hybrid pair is not mapped (hybrid_r=0 only)
    peft = ll.PeftFormat(
        {"lora_A": "gralora_A", "lora_B": "gralora_B"}, {"hybrid_r": 0, "fan_in_fan_out": False, "bias": "none"},
        convert=_to_peft, importable=True, peft_type="GRALORA",
        config_fields={"r": "r", "alpha": "alpha", "gralora_k": "gralora_k"},
        neutral=("gralora_dropout", "init_weights"),
    )

    def param_specs(d_in, d_out, cfg):
        k = block_count(cfg.gralora_k, cfg.r, d_in, d_out)
        specs = {
            "lora_A": ll.ParamSpec((k, d_in // k, cfg.r), init=_per_slice_kaiming),
            "lora_B": ll.ParamSpec((k, cfg.r, d_out // k), init="zeros"),
        }
        if cfg.hybrid_r:
            specs["lora_A_hybrid"] = ll.ParamSpec((cfg.hybrid_r, d_in), init=_hybrid_kaiming(d_out))
            specs["lora_B_hybrid"] = ll.ParamSpec((d_out, cfg.hybrid_r), init="zeros")
        return specs

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / (cfg.r + cfg.hybrid_r)

    def forward(layer, x, y):
        a, b = layer.lora_A, layer.lora_B
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        y = torch.add(y, block_update(x, a, b), alpha=layer.lora_scaling)
        if layer.lora_cfg.hybrid_r:
            y = ll.low_rank_update(x, layer.lora_A_hybrid, layer.lora_B_hybrid, layer.lora_scaling, y)
        return y

    def merge(layer, weight, bias):
        # the update is linear in x: delta^T = update(I)
        eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        delta = block_update(eye, layer.lora_A.to(weight), layer.lora_B.to(weight)).T
        if layer.lora_cfg.hybrid_r:
            delta = delta + layer.lora_B_hybrid.to(weight) @ layer.lora_A_hybrid.to(weight)
        return torch.add(weight, delta, alpha=layer.lora_scaling), bias

"""HiRA: Hadamard high-rank adaptation (Huang et al. 2025, ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS).

The low-rank product ``B A`` does not add to the frozen weight, it modulates it entry by
entry (Hadamard product ``*``), so the update ``W * (B A)`` has the rank of ``W`` at most,
not ``r``::

    y' = y + (W * (B A)) x,     A: (r, d_in), B: (d_out, r),     W' = W + W * (B A)

as PEFT's ``hira.Linear`` computes it (``F.linear(x, W * (B A))``; no ``alpha / r`` scale:
PEFT has none, ``cfg.alpha`` is unused). The hook builds the (d_out, d_in) matrix
``W * (B A)`` on every call (one product of two r-wide factors and one elementwise
product): that is the method, the update is not low-rank and has no factorised form.

Identity at init: as PEFT (``init_weights=True``), ``A`` is kaiming-uniform (a=sqrt(5))
and ``B`` is zeros, so ``W * (B A) = 0`` and ``y' = y`` exactly. ``B``'s first gradient is
``((W * dy^T x) A^T``, non-zero, then ``A`` moves. ``init_weights="gaussian"`` draws ``A``
from N(0, 1/r^2) as PEFT's ``"gaussian"`` does (``B`` stays zero). ``A`` is stored in
fp32 whatever ``cfg.dtype``: its gradient ``B^T (W * dy^T x)`` carries a factor of ``W``
(entries ~0.02 in LLMs) on top of a near-zero ``B``, Adam's steps on it are then far below
lr, and bf16 storage (spacing 2^-9 near 0.1) rounds them away: measured on the Qwen3
test model, an up_proj ``A`` did not move at all in 20 steps at lr 1e-4 with bf16 storage.

Layers: the forward reads the base weight on every call, through the layer kind's reader
(``ll.layer_kind(layer).read``, what ``ll.dense_weight`` uses): ``nn.Linear``, GPT-2
``Conv1D`` (its transposed storage is read as (d_out, d_in)) and bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` (dequantized on every forward, as PEFT's bnb HiRA does).
A linear-like layer no kind understands raises ``ll.WeightAccessError`` at attach.

PEFT format (``lora_lite.export_peft`` / ``import_peft``): PEFT's ``HIRA`` adapter,
``lora_A`` / ``lora_B`` as ``hira_A`` / ``hira_B`` (same shapes), ``r`` as ``r``. Import
accepts ``hira_dropout``, ``init_weights`` and ``fan_in_fan_out`` whatever their values
(training noise, init, and a flag PEFT itself corrects per layer kind) and refuses
``rank_pattern``, and adapters on embeddings or convolutions (not linear layers here).

Not implemented from PEFT: ``hira_dropout`` (lora-lite variants take no dropout),
embeddings and convolutions (PEFT's ``hira.Embedding`` / ``hira.Conv*d``; only
linear-like layers are declared), ``rank_pattern``, and ``init_weights=False`` (random
``B``: not the identity, PEFT keeps it for debugging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll

_INITS = ("kaiming", "gaussian")


@dataclass
class HiRAConfig(ll.LoraLiteConfig):
    variant: str = "hira"
    # "kaiming": A kaiming-uniform(a=sqrt(5)) (PEFT's init_weights=True); "gaussian": A ~ N(0, 1/r^2)
    init_weights: str = "kaiming"

    def validate(self):
        if self.init_weights not in _INITS:
            raise ll.ConfigError(f"hira init_weights must be one of {_INITS}, got {self.init_weights!r}.")


def _gaussian(data: torch.Tensor) -> None:
    nn.init.normal_(data, std=1.0 / data.shape[0])


class HiRA:
    name = "hira"
    config_class = HiRAConfig
    additive = True  # y + delta(x): rows of a batch may use different attachments
    # PEFT's HIRA: hira_A / hira_B one to one. fan_in_fan_out: PEFT sets it per layer kind itself
    # (False on nn.Linear, True on Conv1D), the tensors' layout does not depend on it
    peft = ll.PeftFormat(
        {"lora_A": "hira_A", "lora_B": "hira_B"},
        peft_type="HIRA",
        config_fields={"r": "r"},
        neutral=("hira_dropout", "init_weights", "fan_in_fan_out"),
    )

    def param_specs(d_in, d_out, cfg):
        return {
            # fp32 whatever cfg.dtype: A's gradient is B^T (W * dy^T x), carrying a factor of W (entries
            # ~0.02 in LLMs) on top of B (zero at init), and bf16 rounds its Adam steps to nothing
            "lora_A": ll.ParamSpec(
                (cfg.r, d_in), init="kaiming" if cfg.init_weights == "kaiming" else _gaussian, keep_fp32=True
            ),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    def init(layer):
        ll.dense_weight(layer)  # WeightAccessError now, at attach, for storage no kind reads
        # resolve the layer kind's reader once, not per forward
        layer.lora_read_weight = ll.layer_kind(layer).read

    def forward(layer, x, y):
        dt = x.dtype
        w, a, b = layer.lora_read_weight(layer), layer.lora_A, layer.lora_B
        if w.dtype != dt:
            w = w.to(dt)
        if a.dtype != dt:  # A is fp32 storage; B follows cfg.dtype
            a = a.to(dt)
        if b.dtype != dt:
            b = b.to(dt)
        return y + F.linear(x, w * (b @ a))

    def merge(layer, weight, bias):
        # W' = W + W * (B A): the hooked map with the modulated weight folded in
        return torch.addcmul(weight, weight, layer.lora_B.float() @ layer.lora_A.float()), bias

"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

Equation, for a frozen layer ``y = W x (+ b)``::

    y' = y + (alpha / r) * B A x,     A: (r, d_in), B: (d_out, r)

Identity at init: ``A`` is kaiming-uniform (as ``nn.Linear`` and PEFT initialise it),
``B`` is zeros, so ``B A x = 0`` and ``y' = y`` exactly; the first gradient step moves
``B`` (its gradient ``(alpha/r) * dy (A x)^T`` is non-zero), then ``A``.

Layers: any linear-like layer. LoRA never reads the base weight, so quantized layers
(bitsandbytes 4/8-bit) work as they are.
"""

from __future__ import annotations

import torch

import lora_lite as ll


class LoRA:
    name = "lora"
    additive = True  # y + delta(x): rows of a batch may use different attachments
    # PEFT's LoRA is this equation term for term: both directions are exact
    peft = ll.PeftFormat({"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}, {"use_dora": False})

    @staticmethod
    @ll.hookimpl
    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    @staticmethod
    @ll.hookimpl
    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r

    @staticmethod
    @ll.hookimpl
    def forward(layer, x, y):
        return ll.low_rank_update(x, layer.lora_A, layer.lora_B, layer.lora_scaling, y)

    def merge(layer, weight, bias):
        # W' = W + s B A (in float32: weight is float32)
        return torch.addmm(weight, layer.lora_B.float(), layer.lora_A.float(), alpha=layer.lora_scaling), bias

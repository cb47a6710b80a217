"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

The adapted weight is a learned magnitude times a unit direction, the direction being
the LoRA-updated weight ``V = W + s B A`` (``s = alpha / r``) normalised row-wise::

    W' = diag(m / ||V||) V,         ||V||: (d_out,) row norms of V, detached
    y' = (m / ||V||) * (W x + s B A x) + b  =  y + (m / ||V|| - 1)(y - b) + (m / ||V||) s B A x

``||V||`` is treated as a constant (no gradient), as the paper suggests (section 4.3)
and PEFT does. The bias passes through unscaled: the hook subtracts it from the base
output, rescales, and adds it back.

Identity at init: ``B`` is zeros and ``m`` is initialised to the row norms of ``W``,
so ``V = W``, ``m / ||V|| = 1`` and ``y' = y``. ``m`` is stored in fp32 whatever
``cfg.dtype`` says, so steps near its (weight-norm sized) values are not rounded away.

Layers: any layer whose dense weight lora-lite can read (``lora_lite.dense_weight``:
``nn.Linear`` and every registered layer kind, including quantized storage that a
kind dequantizes). The forward needs ``W`` on every call for ``||V||``; a layer no kind
understands raises ``WeightAccessError`` at attach.
"""

from __future__ import annotations

import torch

import lora_lite as ll


class DoRA:
    name = "dora"
    # PEFT's DoRA: the same m / ||W + s B A|| row scaling, with m under another name
    peft = ll.PeftFormat(
        {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"},
        {"use_dora": True},
    )

    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
            "lora_magnitude": ll.ParamSpec((d_out,), init="empty", keep_fp32=True),
        }

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r
        with torch.no_grad():
            layer.lora_magnitude.copy_(torch.linalg.vector_norm(ll.dense_weight(layer).float(), dim=1))
        # resolve the layer kind's reader once, not per forward
        layer.lora_read_weight = ll.layer_kind(layer).read

    def forward(layer, x, y):
        dt = x.dtype
        a, b, s = layer.lora_A.to(dt), layer.lora_B.to(dt), layer.lora_scaling
        with torch.no_grad():  # ||W + s B A|| is a constant for autograd (paper, section 4.3)
            v = torch.addmm(layer.lora_read_weight(layer).to(dt), b, a, alpha=s)
            # accumulate in fp32 like the fp32 magnitude, so m / ||V|| is 1 at init in bf16 too
            norm = torch.linalg.vector_norm(v, dim=1, dtype=torch.float32)
        g = (layer.lora_magnitude / norm).to(dt)
        lora = ll.low_rank_update(x, a, b, s)
        bias = getattr(layer, "bias", None)
        base = y if bias is None else y - bias
        # y + (g - 1)(y - b) + g s B A x: exactly y when g == 1, in any dtype
        return y + (g - 1) * base + g * lora

    def merge(layer, weight, bias):
        # W' = diag(m / ||V||) V with V = W + s B A (the paper's merged weight); the bias passes through
        v = torch.addmm(weight, layer.lora_B.float(), layer.lora_A.float(), alpha=layer.lora_scaling)
        return v * (layer.lora_magnitude.float() / torch.linalg.vector_norm(v, dim=1))[:, None], bias

"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

Equation, for a frozen layer ``y = W x (+ b)``::

    y' = y + (alpha / r) * B A x,     A: (r, d_in), B: (d_out, r)

Identity at init: ``A`` is kaiming-uniform (as ``nn.Linear`` and PEFT initialise it),
``B`` is zeros, so ``B A x = 0`` and ``y' = y`` exactly; the first gradient step moves
``B`` (its gradient ``(alpha/r) * dy (A x)^T`` is non-zero), then ``A``.

Layers: any linear-like layer. LoRA never reads the base weight, so quantized layers
(bitsandbytes 4/8-bit) work as they are. Also, named by ``target_names``, ``nn.Embedding``
and ``nn.Conv1d``/``nn.Conv2d`` as PEFT does them: an embedding's ``A`` (r, vocab) is a
second lookup table (zeros at init, ``B`` normal: PEFT's choice), ``delta = s B A[:, x]``;
a convolution's ``A`` is a conv with the layer's kernel, stride, padding and dilation into
``r`` channels and ``B`` a 1x1 conv back, ``delta = s conv_B(conv_A(x))``. Every one of
these is ``W + s B A`` on the layer's (d_out, d_in) weight view, which is what ``merge``
writes. The linear path checks one dict entry more than before for these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lora_lite as ll

_CONV = {"torch-conv1d": F.conv1d, "torch-conv2d": F.conv2d}


def _embedding_delta(layer, x, y):
    h = F.embedding(x, layer.lora_A.T.to(y.dtype), padding_idx=layer.padding_idx)
    return torch.add(y, F.linear(h, layer.lora_B.to(y.dtype)), alpha=layer.lora_scaling)


def _conv_delta(layer, x, y):
    conv = layer.lora_conv
    h = conv(x, layer.lora_A.to(x.dtype), None, layer.stride, layer.padding, layer.dilation)
    return torch.add(y, conv(h, layer.lora_B.to(x.dtype)), alpha=layer.lora_scaling)


class LoRA:
    name = "lora"
    layer_kinds = ("linear-like", "embedding", "torch-conv1d", "torch-conv2d")
    additive = True  # y + delta(x): rows of a batch may use different attachments
    # PEFT's LoRA is this equation term for term: both directions are exact
    peft = ll.PeftFormat({"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}, {"use_dora": False})

    def param_specs(d_in, d_out, cfg, target):
        kind = ll.kind_name(target.layer)
        if kind in _CONV:
            layer, ones = target.layer, (1,) * len(target.layer.kernel_size)
            return {
                "lora_A": ll.ParamSpec((cfg.r, layer.in_channels, *layer.kernel_size), init="kaiming"),
                "lora_B": ll.ParamSpec((layer.out_channels, cfg.r, *ones), init="zeros"),
            }
        if kind == "embedding":
            return {"lora_A": ll.ParamSpec((cfg.r, d_in), init="zeros"), "lora_B": ll.ParamSpec((d_out, cfg.r), init="normal")}
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r
        kind = ll.kind_name(layer)
        if kind in _CONV:
            layer.lora_conv, layer.lora_op = _CONV[kind], _conv_delta
        elif kind == "embedding":
            layer.lora_op = _embedding_delta

    def forward(layer, x, y):
        op = layer.__dict__.get("lora_op")
        if op is not None:
            return op(layer, x, y)
        return ll.low_rank_update(x, layer.lora_A, layer.lora_B, layer.lora_scaling, y)

    def merge(layer, weight, bias):
        # W' = W + s B A on the (d_out, d_in) weight view (a conv's kernels flattened, an embedding's table^T)
        a, b = layer.lora_A.float(), layer.lora_B.float()
        return torch.addmm(weight, b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), alpha=layer.lora_scaling), bias

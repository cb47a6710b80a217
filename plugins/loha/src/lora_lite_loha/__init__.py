"""LoHa: low-rank Hadamard product (Hyeon-Woo et al. 2022, FedPara, https://arxiv.org/abs/2108.06098),
as LyCORIS and PEFT's ``loha`` adapt a layer with it.

Two rank-r products are multiplied entry by entry (``*``), so the update reaches rank
``r^2`` with the parameters of two rank-r LoRAs::

    y' = y + s * ((W1a W1b) * (W2a W2b)) x,     s = alpha / r,
    W1a, W2a: (d_out, r),  W1b, W2b: (r, d_in)

Identity at init: as PEFT, ``W1a``, ``W1b``, ``W2a`` are kaiming-uniform (a=sqrt(5)) and
``W2b`` is zeros, so ``W2a W2b = 0`` and ``y' = y`` exactly. ``W2b`` moves first (its
gradient ``s W2a^T (dY * (W1a W1b))`` is non-zero), then the others.

Storage: ``W1a``, ``W1b``, ``W2a`` are kept in fp32 whatever ``cfg.dtype``; ``W2b``
follows it. The first three start at kaiming scale (``W1a``, ``W2a`` have fan-in r: entries
up to ``1/sqrt(r)``, 0.5 at r=4, where bf16's spacing is 2^-9) and their gradients carry a
factor of ``W2b``, which starts at zero, so their Adam steps are far below lr and bf16
rounds them away (measured: a toy model's ``kv_mix.lora_w2_a`` did not move in 20 steps
at lr 1e-4 with bf16 storage). They are ``r (2 d_out + d_in)`` numbers per layer.

How the update is applied (``delta_form``). A Hadamard product of rank-r products is
itself a rank-``r^2`` product: with ``U[o, (i, j)] = W1a[o, i] W2a[o, j]`` (d_out, r^2) and
``V[(i, j), c] = W1b[i, c] W2b[j, c]`` (r^2, d_in), ``(W1a W1b) * (W2a W2b) = U V``. So per
token the hook can cost ``r^2 (d_in + d_out)`` multiply-adds (``"factorised"``: ``s U (V
x)``, building U and V is as cheap) or ``d_in d_out`` (``"dense"``: build the (d_out, d_in)
delta, ``F.linear(x, delta)``, PEFT's way, plus ``2 r d_in d_out`` to build it).
``"auto"`` (default) picks, per target at attach, the factorised form when ``r^2 (d_in +
d_out) < d_in d_out`` and the dense one otherwise: on LLM shapes (d = 4096, r = 8) the
factorised form is 32x fewer multiply-adds per token and keeps only ``r^2`` numbers per
token for backward; the dense one wins only when ``r^2`` nears ``d / 2`` (toy widths).
Both forms compute the same function (tested to float rounding).

Layers: LoHa never reads the base weight, so every linear-like layer (``nn.Linear``, GPT-2
``Conv1D``, bitsandbytes 4/8-bit) works as it is. Also, named by ``target_names``,
``nn.Conv1d``/``nn.Conv2d``, as PEFT does without ``use_effective_conv2d``: the factors
act on the flattened (out, in * prod(kernel)) weight view and the dense delta, reshaped to
the kernel, is convolved with the layer's stride, padding and dilation. ``merge`` writes
``W + s (W1a W1b) * (W2a W2b)`` on that view.

PEFT format (``lora_lite.export_peft`` / ``import_peft``): PEFT's ``LOHA`` adapter, the
four factors as ``hada_w1_a`` ... ``hada_w2_b`` with the same shapes, ``r`` and ``alpha`` as
PEFT's keys; ``delta_form`` is not written (it does not change the function). Import accepts
``rank_dropout`` / ``module_dropout`` / ``init_weights`` / ``use_effective_conv2d`` whatever
their values (training noise, init, and a flag without effect on linear layers) and refuses
``rank_pattern`` / ``alpha_pattern`` and CP-core tensors (``hada_t1`` / ``hada_t2``).

Not implemented from PEFT: ``rank_dropout`` and ``module_dropout`` (training-time noise;
lora-lite variants take no dropout), ``use_effective_conv2d`` (FedPara's Proposition 3, a
CP core ``t1``/``t2`` per kernel: a different parametrisation for k x k convolutions),
``init_weights=False`` (random ``W2b``, not the identity), ``rank_pattern`` /
``alpha_pattern``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_lite as ll

_FORMS = ("auto", "factorised", "dense")
_CONV = {"torch-conv1d": F.conv1d, "torch-conv2d": F.conv2d}


@dataclass
class LoHaConfig(ll.LoraLiteConfig):
    variant: str = "loha"
    # "auto": the cheaper of the two below at each target's shape (see the module docstring)
    delta_form: str = "auto"

    def validate(self):
        if self.delta_form not in _FORMS:
            raise ll.ConfigError(f"loha delta_form must be one of {_FORMS}, got {self.delta_form!r}.")


def _cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dt else t.to(dt)


def _factors(layer, dt):
    return (_cast(layer.lora_w1_a, dt), _cast(layer.lora_w1_b, dt), _cast(layer.lora_w2_a, dt), _cast(layer.lora_w2_b, dt))


def _delta(layer, dt):
    """(W1a W1b) * (W2a W2b), unscaled, (d_out, d_in)."""
    w1a, w1b, w2a, w2b = _factors(layer, dt)
    return (w1a @ w1b) * (w2a @ w2b)


def _factorised(layer, x, y):
    w1a, w1b, w2a, w2b = _factors(layer, x.dtype)
    r = w1a.shape[1]
    u = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r * r)  # (d_out, r^2)
    v = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, w1b.shape[1])  # (r^2, d_in)
    return ll.low_rank_update(x, v, u, layer.lora_scaling, y)


def _dense(layer, x, y):
    return torch.add(y, F.linear(x, _delta(layer, x.dtype)), alpha=layer.lora_scaling)


def _conv(layer, x, y):
    kernel = _delta(layer, x.dtype).reshape(layer.weight.shape)
    h = layer.lora_conv(x, kernel, None, layer.stride, layer.padding, layer.dilation)
    return torch.add(y, h, alpha=layer.lora_scaling)


class LoHa:
    name = "loha"
    config_class = LoHaConfig
    layer_kinds = ("linear-like", "torch-conv1d", "torch-conv2d")
    additive = True  # y + delta(x): rows of a batch may use different attachments
    # PEFT's LOHA: hada_* one to one; delta_form is how lora-lite computes it, not part of the file
    peft = ll.PeftFormat(
        {"lora_w1_a": "hada_w1_a", "lora_w1_b": "hada_w1_b", "lora_w2_a": "hada_w2_a", "lora_w2_b": "hada_w2_b"},
        peft_type="LOHA",
        config_fields={"r": "r", "alpha": "alpha"},
        # use_effective_conv2d: no effect on linear layers; a CP-core file holds hada_t1/hada_t2, refused as keys
        neutral=("rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d"),
    )

    def param_specs(d_in, d_out, cfg):
        # the kaiming-drawn factors stay fp32 whatever cfg.dtype (see the module docstring)
        return {
            "lora_w1_a": ll.ParamSpec((d_out, cfg.r), init="kaiming", keep_fp32=True),
            "lora_w1_b": ll.ParamSpec((cfg.r, d_in), init="kaiming", keep_fp32=True),
            "lora_w2_a": ll.ParamSpec((d_out, cfg.r), init="kaiming", keep_fp32=True),
            "lora_w2_b": ll.ParamSpec((cfg.r, d_in), init="zeros"),
        }

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r
        kind = ll.kind_name(layer)
        if kind in _CONV:
            layer.lora_conv, layer.lora_op = _CONV[kind], _conv
            return
        d_out, d_in = layer.lora_w1_a.shape[0], layer.lora_w1_b.shape[1]
        form = cfg.delta_form
        if form == "auto":
            form = "factorised" if cfg.r * cfg.r * (d_in + d_out) < d_in * d_out else "dense"
        layer.lora_op = _factorised if form == "factorised" else _dense

    def forward(layer, x, y):
        return layer.lora_op(layer, x, y)

    def merge(layer, weight, bias):
        # W' = W + s (W1a W1b) * (W2a W2b) on the (d_out, d_in) weight view (a conv's kernels flattened)
        return torch.add(weight, _delta(layer, torch.float32), alpha=layer.lora_scaling), bias

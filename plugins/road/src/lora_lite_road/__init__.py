"""RoAd: 2D rotary adaptation (Liao et al. 2024, https://arxiv.org/abs/2409.00119).

The output ``y = W x + b`` is cut into groups of ``group_size``; inside a group, element
``i`` pairs with element ``i + group_size/2``
(PEFT's convention, which allows an elementwise implementation). Each pair is rotated
and scaled, ``y' = y * c1 + rot(y) * c2`` with ``rot(y) = (-y_(i+g/2), y_i)`` per pair::

    y'_i       = c1_i       y_i - c2_i       y_(i+g/2)
    y'_(i+g/2) = c2_(i+g/2) y_i + c1_(i+g/2) y_(i+g/2)

``c1 = a cos t`` and ``c2 = a sin t`` from learned angles ``t`` and scales ``a``;
``road_variant`` sets how many (t, a) values there are:

- ``road_1``: one (t, a) per pair, shared by both elements (d_out/2 each);
- ``road_2``: one (t, a) per element (d_out each);
- ``road_4``: separate (t, a) for the cosine and the sine column (2 d_out each):
  ``c1 = a cos t``, ``c2 = a' sin t'``.

Identity at init: ``t = 0`` and ``a = 1``, so ``c1 = 1``, ``c2 = 0`` and ``y' = y``
exactly. The scales start at 1.0 and are stored in float32 whatever ``cfg.dtype`` says
(bf16's spacing near 1.0 would freeze them); the angles start at 0, where bf16 is fine.
``r`` and ``alpha`` are not used.

Layers: any linear-like layer whose ``d_out`` is a multiple of ``group_size`` (checked
before attach). RoAd acts on the output only and never reads the base weight, so
quantized layers work as they are. The rotation also acts on the bias, as in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import lora_lite as ll

_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoAdConfig(ll.LoraLiteConfig):
    variant: str = "road"
    road_variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: int = 64

    def validate(self):
        if self.group_size < 2 or self.group_size % 2:
            raise ll.ConfigError(f"road group_size must be an even number >= 2, got {self.group_size}.")


def _columns(layer, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosine and sine columns ``c1, c2``, shaped (groups, 2, group_size/2)."""
    half = group_size // 2
    theta, alpha = layer.lora_theta.to(dtype), layer.lora_alpha.to(dtype)
    kind = layer.lora_cfg.road_variant
    if kind == "road_4":
        theta, alpha = theta.view(-1, 2, 2, half), alpha.view(-1, 2, 2, half)
        return alpha[:, 0] * theta[:, 0].cos(), alpha[:, 1] * theta[:, 1].sin()
    theta = theta.view(-1, 1 if kind == "road_1" else 2, half)
    alpha = alpha.view_as(theta)
    return alpha * theta.cos(), alpha * theta.sin()


class RoAd:
    name = "road"
    size_knob = None  # two (or four) numbers per output feature whatever group_size is
    lrs = (1e-3, 3e-3, 1e-2, 3e-2)  # few parameters, each an angle or a scale
    config_class = RoAdConfig
    peft = ll.PeftFormat({"lora_theta": "road_theta", "lora_alpha": "road_alpha"}, peft_type="ROAD",
                         config_fields={"road_variant": "variant", "group_size": "group_size"},
                         neutral=("init_weights",))

    def param_specs(d_in, d_out, cfg):
        if d_out % cfg.group_size:
            raise ll.ConfigError(
                f"road needs d_out divisible by group_size={cfg.group_size}, but a target has d_out={d_out}; "
                "lower group_size (a divisor of every target's output width) or narrow the targets."
            )
        size = int(d_out * _SIZE[cfg.road_variant])
        return {
            "lora_theta": ll.ParamSpec((size,), init="zeros"),
            "lora_alpha": ll.ParamSpec((size,), init="ones", keep_fp32=True),
        }

    def forward(layer, x, y):
        g = layer.lora_cfg.group_size
        c1, c2 = _columns(layer, g, y.dtype)
        shape = (c1.shape[0], 2, g // 2)
        # flat d_out-long columns, the sign of rot() folded into the sine column, so the
        # activations see one swap and one addcmul: broadcasting the (groups, k, g/2)
        # columns over grouped activations made backward 3x slower (reductions over
        # broadcast dims)
        c1 = c1.expand(shape).reshape(-1)
        c2 = torch.cat((-c2[:, :1], c2[:, -1:]), dim=1).expand(shape).reshape(-1)
        swapped = y.unflatten(-1, (-1, 2, g // 2)).flip(-2).flatten(-3)  # (y_(i+g/2), y_i) per pair
        return torch.addcmul(y * c1, swapped, c2)

    def merge(layer, weight, bias):
        # the output rotation is linear in y, y' = y G with G = forward(I): W' = G^T W, b' = b G
        eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        g = RoAd.forward(layer, eye, eye)
        return g.T @ weight, None if bias is None else bias @ g

"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

One pair of frozen random matrices is shared by every target of the attachment,
``A: (r, d_in_max)`` and ``B: (d_out_max, r)`` (the largest input and output widths
among the targets); a layer uses the leading block ``A[:, :d_in]``, ``B[:d_out, :]``, as
PEFT slices them. Each layer trains only two vectors::

    y' = y + lambda_b * (B[:d_out] (lambda_d * (A[:, :d_in] x))),   lambda_d: (r,), lambda_b: (d_out,)

``A`` and ``B`` are regenerated from ``projection_prng_key`` at every attach and load
(a CPU ``torch.Generator`` seeded with it; uniform with bound ``sqrt(6 / fan_in)``, A
then B, exactly PEFT's draw, so the same key gives PEFT's matrices). They are not saved
unless ``save_projection=True`` (then every layer's key holds the full shared matrices).
``alpha`` is not used: the vectors carry the scale.

Identity at init: ``lambda_b`` is zeros, so the update is exactly zero; ``lambda_d``
starts at ``d_initial`` (0.1, PEFT's default) and is stored in fp32 whatever
``cfg.dtype`` says, because bf16's spacing near 0.1 (2^-11) swallows small steps.

Layers: any linear-like layer. VeRA never reads the base weight, so quantized layers
work as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class VeRAConfig(ll.LoraLiteConfig):
    variant: str = "vera"
    projection_prng_key: int = 0
    save_projection: bool = False
    d_initial: float = 0.1

    def validate(self):
        if self.d_initial == 0:
            raise ll.ConfigError("vera d_initial must be non-zero: with lambda_b = 0 too, no gradient ever flows.")


def _projections(cfg, targets, device):
    g = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
    d_in, d_out = max(t.d_in for t in targets), max(t.d_out for t in targets)
    a = torch.empty(cfg.r, d_in).uniform_(-math.sqrt(6 / d_in), math.sqrt(6 / d_in), generator=g)
    b = torch.empty(d_out, cfg.r).uniform_(-math.sqrt(6 / cfg.r), math.sqrt(6 / cfg.r), generator=g)
    frozen = lambda t: torch.nn.Parameter(t.to(device=device, dtype=cfg.dtype), requires_grad=False)  # noqa: E731
    return frozen(a), frozen(b)


class VeRA:
    name = "vera"
    lrs = (1e-3, 3e-3, 1e-2, 3e-2)  # only the d_out + r scaling vectors train
    additive = True  # y + delta(x): rows of a batch may use different attachments
    config_class = VeRAConfig
    # PEFT's VeRA: the shared pair once, as base_model.vera_A / vera_B, when save_projection
    peft = ll.PeftFormat(
        {"lora_lambda_d": "vera_lambda_d", "lora_lambda_b": "vera_lambda_b"},
        {"fan_in_fan_out": False, "bias": "none"},
        peft_type="VERA",
        config_fields={"r": "r", "projection_prng_key": "projection_prng_key", "save_projection": "save_projection",
                       "d_initial": "d_initial"},
        shared={"lora_vera_A": "base_model.vera_A", "lora_vera_B": "base_model.vera_B"},
        neutral=("vera_dropout", "init_weights"),
    )

    def param_specs(d_in, d_out, cfg):
        shared = {"init": "empty", "trainable": False, "persistent": cfg.save_projection}
        return {
            "lora_lambda_d": ll.ParamSpec((cfg.r,), init=cfg.d_initial, keep_fp32=True),
            "lora_lambda_b": ll.ParamSpec((d_out,), init="zeros"),
            # placeholders, replaced in init by the attachment's one shared pair
            "lora_vera_A": ll.ParamSpec((0,), **shared),
            "lora_vera_B": ll.ParamSpec((0,), **shared),
        }

    def init(layer, cfg, targets):
        first = targets[0].layer
        if layer is first:
            first.lora_vera_A, first.lora_vera_B = _projections(cfg, targets, layer.lora_lambda_b.device)
        # the same Parameter object on every layer: one copy in memory, kept shared by model.to()
        layer.lora_vera_A, layer.lora_vera_B = first.lora_vera_A, first.lora_vera_B

    def forward(layer, x, y):
        dt = x.dtype
        # the shared pair lives on the first target's device; a model split over devices
        # copies the slice per call, as PEFT does (a no-op on one device)
        a = layer.lora_vera_A[:, : x.shape[-1]].to(x.device, dt)
        b = layer.lora_vera_B[: y.shape[-1]].to(x.device, dt)
        # the vectors scale the activations, not the frozen slices: folded into A and B their
        # gradients become GEMMs over all tokens (measured 2-20 % slower per training step)
        h = F.linear(x, a) * layer.lora_lambda_d.to(dt)
        return y + F.linear(h, b) * layer.lora_lambda_b.to(dt)

    def merge(layer, weight, bias):
        # W' = W + diag(lambda_b) B diag(lambda_d) A, on the layer's slices of the shared pair
        d_out, d_in = weight.shape
        a = layer.lora_vera_A[:, :d_in].to(weight) * layer.lora_lambda_d.to(weight)[:, None]
        b = layer.lora_vera_B[:d_out].to(weight) * layer.lora_lambda_b.to(weight)[:, None]
        return weight + b @ a, bias

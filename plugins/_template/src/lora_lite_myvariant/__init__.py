"""myvariant: gated low-rank update (template; replace with your method).

Paper: <link to the paper>.

Equation, for a frozen layer ``y = W x (+ b)``::

    y' = y + g * (alpha / r) * B A x,   A: (r, d_in), B: (d_out, r), g: (d_out,)

Identity at init: ``B`` is zeros, so the update is exactly zero whatever ``A`` and ``g``.
``g`` starts at ``gate_init`` (1.0) and is stored in fp32 (``keep_fp32``) so bf16 storage
cannot round its updates away.

Layers: any linear-like layer (the weight is never read).
"""

from __future__ import annotations

from dataclasses import dataclass

import lora_lite as ll


@dataclass
class MyVariantConfig(ll.LoraLiteConfig):
    variant: str = "myvariant"
    gate_init: float = 1.0

    def validate(self):
        if self.gate_init <= 0:
            raise ll.ConfigError(f"myvariant gate_init must be > 0, got {self.gate_init}.")


class MyVariant:
    name = "myvariant"
    config_class = MyVariantConfig

    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
            "lora_gate": ll.ParamSpec((d_out,), init=cfg.gate_init, keep_fp32=True),
        }

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r

    def forward(layer, x, y):
        delta = ll.low_rank_update(x, layer.lora_A, layer.lora_B, layer.lora_scaling)
        return y + delta * layer.lora_gate.to(x.dtype)

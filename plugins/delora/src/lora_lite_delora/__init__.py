"""DeLoRA: decoupled low-rank adaptation (Bini et al. 2025, https://arxiv.org/abs/2503.18225).

With ``w`` the per-input-channel norms of the frozen weight (``||W[:, j]||``)::

    y' = y + (lambda / r) * B diag(1 / (||a_i|| ||b_i||)) A (w * x)

``a_i`` is row i of ``A`` (r, d_in), ``b_i`` column i of ``B`` (d_out, r). Normalising
each rank-1 term bounds the update's norm by ``lambda`` (times the weight norms),
decoupling its angle (A, B) from its strength (the learnable scalar ``lambda``, init
``lambda0`` = 15 as in the paper and PEFT). Norms are clamped at 1e-4 as in PEFT.

Identity at init: ``B`` is zeros, so the update is exactly zero. ``lambda`` is stored in
fp32 whatever ``cfg.dtype`` so small steps are not rounded away.

Layers: any layer whose dense weight lora-lite can read (``lora_lite.dense_weight``:
``nn.Linear`` and every registered layer kind, including dequantized bnb storage);
``w`` is computed once from the dense weight and saved with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class DeLoRAConfig(ll.LoraLiteConfig):
    variant: str = "delora"
    lambda0: float = 15.0

    def validate(self):
        if self.lambda0 <= 0:
            raise ll.ConfigError(f"delora lambda0 must be > 0, got {self.lambda0}.")


class DeLoRA:
    name = "delora"
    additive = True  # y + delta(x): rows of a batch may use different attachments
    config_class = DeLoRAConfig
    # PEFT's DeLoRA stores the weight norms too (delora_w_norm); delora_lambda is lambda's init
    peft = ll.PeftFormat(
        {"lora_A": "delora_A", "lora_B": "delora_B", "lora_lambda": "delora_lambda", "lora_w_norm": "delora_w_norm"},
        {"bias": "none"},
        peft_type="DELORA",
        config_fields={"r": "r", "lambda0": "delora_lambda"},
        neutral=("module_dropout", "init_weights"),
    )

    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
            "lora_lambda": ll.ParamSpec((1,), init=cfg.lambda0, keep_fp32=True),
            "lora_w_norm": ll.ParamSpec((d_in,), init="empty", trainable=False),
        }

    def init(layer, cfg):
        with torch.no_grad():
            w = ll.dense_weight(layer).detach().to(torch.float32)
            layer.lora_w_norm.copy_(w.norm(dim=0))
        layer.lora_inv_r = 1.0 / cfg.r

    def forward(layer, x, y):
        dt = x.dtype
        a, b = layer.lora_A, layer.lora_B
        # while B is ~0 its clamped norm makes the per-rank scale huge (~1e5 at init, past fp16's
        # 65504): compute it in fp32 and fold it into B, where B * scale is small (0 at init)
        scale = layer.lora_lambda * layer.lora_inv_r / (
            a.float().norm(dim=1).clamp_min(1e-4) * b.float().norm(dim=0).clamp_min(1e-4)
        )
        # fold the weight norms into A (r x d_in) instead of scaling x (batch x d_in)
        h = F.linear(x, a.to(dt) * layer.lora_w_norm.to(dt))
        return y + F.linear(h, (b.float() * scale).to(dt))

    def merge(layer, weight, bias):
        # W' = W + (B diag(scale)) (A diag(||w_j||)): the two factors forward applies
        a, b = layer.lora_A.float(), layer.lora_B.float()
        scale = layer.lora_lambda * layer.lora_inv_r / (a.norm(dim=1).clamp_min(1e-4) * b.norm(dim=0).clamp_min(1e-4))
        return weight + (b * scale) @ (a * layer.lora_w_norm.float()), bias

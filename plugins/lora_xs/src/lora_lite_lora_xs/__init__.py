"""LoRA-XS: low-rank adaptation with an extremely small number of parameters (Bałazy et al.
2024, https://arxiv.org/abs/2405.17604).

With the SVD of the frozen weight ``W = U S V^T`` (``(d_out, d_in)``) truncated to its top
``r`` triplets, LoRA-XS freezes ``A = S_r V_r^T`` (``(r, d_in)``) and ``B = U_r``
(``(d_out, r)``) and trains only an ``r x r`` matrix ``R`` between them::

    y' = y + (alpha / r) B R A x  =  y + (alpha / r) U_r R S_r V_r^T x

so each target trains ``r^2`` numbers whatever its width. The split is the official code's
(``utils/initialization_utils.py``: ``lora_A = S_r V_r^T``, ``lora_B = U_r``, forward
``lora_B(R(lora_A(x))) * lora_alpha / r``): all singular values on the input side, ``B``
orthonormal. ``W`` is left as it is (unlike PiSSA nothing is subtracted).

Identity at init: ``R = 0``, so the update is exactly zero. ``R``'s gradient
``(alpha/r) B^T g (A x)^T`` does not vanish at zero because ``A`` and ``B`` are the fixed,
non-zero SVD factors (the official code draws ``R ~ N(0, 1e-5^2)``, which is the identity only
approximately). ``R`` is kept in fp32 whatever ``cfg.dtype`` (``r^2`` numbers: free).

SVD: exact (``torch.linalg.svd`` in fp32 on the weight's device; the official code uses
scikit-learn's randomized ``TruncatedSVD``, an approximation of the same top-r triplets).
Each singular pair's sign is fixed so the largest-magnitude entry of ``u_i`` is positive,
so recomputing the factors gives the same ``A``, ``B`` on any machine up to rounding (``R``'s
entries refer to the pairs' signs). With ``save_factors=True`` (default) ``A`` and ``B`` are
saved in the checkpoint (frozen, ``r (d_in + d_out)`` numbers, the size of a rank-r LoRA) and
a reload copies them in: exact on any machine. ``save_factors=False`` saves only ``R``
(``r^2`` numbers) and a reload recomputes the SVD: exact on the same software and hardware,
close to it elsewhere, wrong only where singular values tie.

Layers: every layer kind whose weight lora-lite can read, through ``lora_lite.dense_weight``:
``nn.Linear``, transformers ``Conv1D`` and bitsandbytes ``Linear4bit`` / ``Linear8bitLt``
(the SVD is then of the dequantized weight, which is exactly what the frozen base
computes with; the weight is never written, so identity at init is exact on quantized
layers too). Storage nothing can read raises ``WeightAccessError`` at attach.

Not implemented from the paper's code: the randomized SVD (``n_iter``, ``random_state``), and
its other reconstruction options (``half_init_dec``, random replacement, non-square latent
maps): they are ablations, not the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class LoRAXSConfig(ll.LoraLiteConfig):
    variant: str = "lora_xs"
    save_factors: bool = True


def svd_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (S_r V_r^T, U_r)`` of ``w``, in float32, each pair's sign fixed (max |u_i| entry > 0)."""
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float32), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))  # (1, r)
    sign[sign == 0] = 1
    return (s * sign[0])[:, None] * vh, u * sign


class LoRAXS:
    name = "lora_xs"
    additive = True  # y + delta(x): rows of a batch may use different attachments
    config_class = LoRAXSConfig
    lrs = (1e-3, 3e-3, 1e-2, 3e-2)  # r*r numbers per layer; the official runs train R at ~4e-3

    def param_specs(d_in, d_out, cfg):
        if cfg.r > min(d_in, d_out):
            raise ll.ConfigError(
                f"lora_xs r={cfg.r} exceeds min(d_in, d_out)={min(d_in, d_out)} of a target (the SVD has no "
                "more triplets); lower r or narrow the targets."
            )
        frozen = {"init": "empty", "trainable": False, "persistent": cfg.save_factors}
        return {
            "lora_R": ll.ParamSpec((cfg.r, cfg.r), init="zeros", keep_fp32=True),
            "lora_A": ll.ParamSpec((cfg.r, d_in), **frozen),
            "lora_B": ll.ParamSpec((d_out, cfg.r), **frozen),
        }

    def init(layer, cfg):
        a, b = svd_factors(ll.dense_weight(layer), cfg.r)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        layer.lora_scaling = cfg.alpha / cfg.r

    def forward(layer, x, y):
        a, r = layer.lora_A, layer.lora_R
        if a.dtype != x.dtype:
            a = a.to(x.dtype)
        # B (R (A x)): three r-wide matmuls, never an (d_out, d_in) matrix
        return ll.low_rank_update(F.linear(x, a), r, layer.lora_B, layer.lora_scaling, y)

    def merge(layer, weight, bias):
        # W' = W + s B R A: exactly what forward adds
        ra = layer.lora_R.float() @ layer.lora_A.float()
        return torch.addmm(weight, layer.lora_B.float(), ra, alpha=layer.lora_scaling), bias

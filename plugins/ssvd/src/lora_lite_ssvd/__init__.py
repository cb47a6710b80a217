"""SSVD: structured SVD-guided fine-tuning (Pu Wang, Shinji Watanabe, Hugo Van hamme 2025,
https://arxiv.org/abs/2509.02830; the authors' code is ESPnet's ``espnet2/layers/lora/layers.py``
``SSVDLinear``, whose math this follows).

With the SVD of the frozen weight ``W = U diag(sigma) V^T`` (``V^T``'s rows: the right,
input-side singular vectors), SSVD rotates the top-k right singular vectors and shifts the
top-k singular values, keeping the left (output-side) vectors fixed::

    W' = U_k diag(sigma_k + sigmoid(g) delta) G V_k^T + (the other triplets, unchanged)
    G  = (I - Q)(I + Q)^-1          Q skew-symmetric, upper triangle = the k(k-1)/2 trainable K

``k = r``. ``delta`` (k), the gate ``g`` (a scalar) and ``K`` train; ``U_k``, ``sigma_k``, ``V_k``
are frozen. The hook adds only the difference to the frozen layer::

    y' = y + U_k M V_k^T x,   M = diag(sigma_k + sigmoid(g) delta) (G - I) + diag(sigmoid(g) delta)

with ``G - I = -2 Q (I + Q)^-1`` computed directly (no cancellation against ``I``).
``rotation="first_order"`` uses ``G = I - 2Q``, which is what ESPnet's ``apply_rotation``
builds (the first-order Cayley map; not exactly orthogonal); ``"cayley"`` (default) is the
exact Cayley map the paper names, equal to it to first order in ``K``.

Identity at init: ``K = 0`` gives ``G = I`` exactly and ``delta = 0`` makes the shift zero, so
``M = 0`` and ``y' = y`` bit for bit. ``delta``'s and ``K``'s gradients at that point are not zero
(``U_k^T g (V_k^T x)^T`` projected on each); the gate's is zero until ``delta`` moves (the first
step). ESPnet instead draws ``delta`` kaiming-uniform (a start off the identity by
``sigmoid(0) delta`` on the singular values); the gate starts at 0 in both. The trainable tensors
and ``sigma_k`` are kept in fp32 whatever ``cfg.dtype``.

``alpha`` is unused (ESPnet's SSVD ignores ``lora_alpha`` too).

Factors and reload: exact ``torch.linalg.svd`` in fp32 (fp64 for an fp64 weight), each triplet's sign fixed (largest-magnitude
entry of ``u_i`` positive) so recomputation does not depend on LAPACK's sign choice.
``save_factors=True`` (default) saves ``U_k``, ``sigma_k``, ``V_k`` (frozen, ``k (d_in + d_out + 1)``
numbers) and a reload copies them in: exact on any machine. ``save_factors=False`` saves only
the ``k + 1 + k(k-1)/2`` trained numbers and recomputes the SVD at load: exact on the same
software and hardware.

Layers: every kind ``lora_lite.dense_weight`` reads: ``nn.Linear``, transformers ``Conv1D``,
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (SVD of the dequantized weight, which is what
the frozen layer computes with; the weight is never written, so identity is exact there too).

Not implemented from ESPnet: ``rotation_ratio`` (k as a fraction of ``min(d_in, d_out)``: pass
``r``), the kaiming start of ``delta`` (not an identity), and its choice of basis on wide layers:
ESPnet factors ``W^T`` when ``d_out < d_in``, which rotates ``W``'s left (output-side) vectors
there; this plugin always rotates the right (input-side) vectors, as the paper describes. On
layers with ``d_out >= d_in`` the two agree (``test_matches_espnet_ssvdlinear_in_float64``).
The paper's SSVD-O follow-up (outer transforms) is a separate method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class SSVDConfig(ll.LoraLiteConfig):
    variant: str = "ssvd"
    rotation: Literal["cayley", "first_order"] = "cayley"
    save_factors: bool = True


def svd_factors(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_k, sigma_k, V_k^T)`` of ``w`` (in fp32, or fp64 for an fp64 weight), each triplet's sign
    fixed (max |u_i| entry > 0)."""
    u, s, vh = torch.linalg.svd(w.detach().to(torch.promote_types(w.dtype, torch.float32)), full_matrices=False)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))  # (1, k)
    sign[sign == 0] = 1
    return u * sign, s, vh * sign[0][:, None]


def skew(triu: torch.Tensor, k: int) -> torch.Tensor:
    """The skew-symmetric ``Q`` (k x k) with ``triu`` as its strict upper triangle (row-major)."""
    rows, cols = torch.triu_indices(k, k, 1, device=triu.device)
    q = triu.new_zeros(k, k).index_put((rows, cols), triu)
    return q - q.T


def core(layer, dtype: torch.dtype) -> torch.Tensor:
    """``M = diag(sigma + sigmoid(g) delta) (G - I) + diag(sigmoid(g) delta)`` (k x k), in ``dtype``."""
    work = torch.promote_types(dtype, torch.float32)
    k = layer.lora_S.shape[0]
    q = skew(layer.lora_K.to(work), k)
    if layer.lora_cfg.rotation == "cayley":
        eye = torch.eye(k, dtype=work, device=q.device)
        g_minus_i = torch.linalg.solve(eye + q, q, left=False).mul(-2.0)  # -2 Q (I + Q)^-1
    else:
        g_minus_i = q.mul(-2.0)
    shift = torch.sigmoid(layer.lora_gate.to(work)) * layer.lora_delta_s.to(work)
    sigma = layer.lora_S.to(work) + shift
    return (sigma[:, None] * g_minus_i + torch.diag(shift)).to(dtype)


class SSVD:
    name = "ssvd"
    config_class = SSVDConfig
    additive = True  # y + delta(x): rows of a batch may use different attachments
    lrs = (3e-4, 1e-3, 3e-3, 1e-2)  # k + 1 + k(k-1)/2 numbers per layer, rotations and spectrum shifts

    def param_specs(d_in, d_out, cfg):
        k = cfg.r
        if k > min(d_in, d_out):
            raise ll.ConfigError(
                f"ssvd r={k} exceeds min(d_in, d_out)={min(d_in, d_out)} of a target (the SVD has no "
                "more triplets); lower r or narrow the targets."
            )
        frozen = {"init": "empty", "trainable": False, "persistent": cfg.save_factors}
        return {
            "lora_U": ll.ParamSpec((d_out, k), **frozen),
            "lora_S": ll.ParamSpec((k,), keep_fp32=True, **frozen),
            "lora_V": ll.ParamSpec((k, d_in), **frozen),
            "lora_delta_s": ll.ParamSpec((k,), init="zeros", keep_fp32=True),
            "lora_gate": ll.ParamSpec((1,), init="zeros", keep_fp32=True),
            "lora_K": ll.ParamSpec((k * (k - 1) // 2,), init="zeros", keep_fp32=True),
        }

    def init(layer, cfg):
        u, s, vh = svd_factors(ll.dense_weight(layer), cfg.r)
        with torch.no_grad():
            layer.lora_U.copy_(u)
            layer.lora_S.copy_(s)
            layer.lora_V.copy_(vh)

    def forward(layer, x, y):
        v = layer.lora_V
        if v.dtype != x.dtype:
            v = v.to(x.dtype)
        # U_k (M (V_k^T x)): k-wide matmuls only, never a (d_out, d_in) matrix
        return ll.low_rank_update(F.linear(x, v), core(layer, x.dtype), layer.lora_U, 1.0, y)

    def merge(layer, weight, bias):
        # W' = W + U_k M V_k^T: exactly what forward adds
        mv = core(layer, torch.float32) @ layer.lora_V.float()
        return torch.addmm(weight, layer.lora_U.float(), mv), bias

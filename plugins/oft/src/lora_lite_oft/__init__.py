"""OFT: orthogonal finetuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280), in the
formulation PEFT's ``tuners/oft`` uses now (OFTv2, Qiu et al. 2025, https://arxiv.org/abs/2506.19847).

The input is split into ``n`` blocks of size ``b`` (``n b = d_in``) and each block is
rotated by its own orthogonal ``R_k`` before the frozen layer sees it::

    y' = W x' (+ b),     x'_k = R_k^T x_k   (as rows: x'_k = x_k R_k, PEFT's einsum)

``R_k`` comes from a skew-symmetric ``Q_k = M_k - M_k^T``, ``M_k`` holding row k of the
trainable ``lora_R`` (n, b(b-1)/2) on its strict upper triangle (``triu_indices`` order,
PEFT's ``oft_R.weight`` layout) through either

- Cayley-Neumann (``use_cayley_neumann``, PEFT's default), with m terms:
  ``R = I + 2 Q + 2 Q^2 + ... + 2 Q^(m-2) + Q^(m-1)``, a truncation of ``(I+Q)(I-Q)^-1``
  (PEFT adds ``2 Q^2 + Q^3`` for m=3 too, so m=3 equals m=4; m=2 is ``I + 2Q``), or
- exact Cayley: ``R = (I - Q)(I + Q)^-1``. (PEFT's two modes have opposite signs in Q;
  both are kept as PEFT has them, so checkpoints agree with PEFT in either mode.)

COFT (``coft``) projects each block's ``Q`` back into the Frobenius ball of radius
``eps / sqrt(n)`` before every forward, in place, as PEFT does.

Identity at init: ``lora_R`` is zeros, so ``Q = 0``, ``R = I`` exactly in both modes
and ``x' = x`` bit for bit. The first gradient is not zero: ``dR/dQ = +-2`` at 0, so
``lora_R`` gets ``+-2 (G - G^T)`` on its triangle, ``G`` being the block of
``x^T dL/dx'``, which is not symmetric in general.

Block size: give ``r`` (blocks per layer) or ``oft_block_size``, not both, as PEFT. A
value that does not divide a layer's ``d_in`` is moved to the nearest divisor, with a
warning, by PEFT's rule, so parameter counts equal PEFT's on every layer.

Layers: any linear-like layer lora-lite targets, ``nn.Linear`` and bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` included: OFT only rotates the input, it never reads the weight.
The layer only has to take ``(..., d_in)`` inputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

import lora_lite as ll


@dataclass
class OFTConfig(ll.LoraLiteConfig):
    variant: str = "oft"
    r: int = 0
    oft_block_size: int = 32
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5

    r_min: ClassVar[int] = 0

    def validate(self):
        if (self.r > 0) == (self.oft_block_size > 0) or self.oft_block_size < 0:
            raise ll.ConfigError(
                f"oft takes r (blocks per layer) or oft_block_size (block size), exactly one of them non-zero, "
                f"since r * oft_block_size = d_in; got r={self.r}, oft_block_size={self.oft_block_size}. "
                "Set the other to 0 (PEFT's default is r=0, oft_block_size=32)."
            )
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 2:
            raise ll.ConfigError(
                f"num_cayley_neumann_terms={self.num_cayley_neumann_terms} makes every R the identity, so the "
                "adapter never trains; use 2 or more (PEFT's default is 5)."
            )
        if self.eps <= 0:
            raise ll.ConfigError(f"oft eps (the COFT radius) must be > 0, got {self.eps}.")


def nearest_divisor(d_in: int, want: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of d_in nearest to ``want`` (ties go down)."""
    if want >= d_in:
        return d_in
    up = next(k for k in range(want, d_in + 1) if d_in % k == 0)
    down = next(k for k in range(want, 0, -1) if d_in % k == 0)
    return down if want - down <= up - want else up


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """Batched orthogonal blocks from skew-symmetric ``q`` (n, b, b), as PEFT computes them."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    rot, power = eye + 2 * q, q
    last = max(neumann_terms - 1, 3) if neumann_terms > 2 else 1
    for k in range(2, last + 1):  # over series terms of the small (n, b, b) blocks only
        power = power @ q
        rot = rot + (1 if k == last else 2) * power
    return rot


class OFT:
    name = "oft"
    lrs = (3e-4, 1e-3, 3e-3, 1e-2)  # rotations: fewer effective degrees of freedom than LoRA's r (d_in + d_out)
    config_class = OFTConfig
    peft = ll.PeftFormat(
        {"lora_R": "oft_R.weight"},
        {"block_share": False, "fan_in_fan_out": False, "bias": "none"},
        peft_type="OFT",
        config_fields={"r": "r", "oft_block_size": "oft_block_size", "use_cayley_neumann": "use_cayley_neumann",
                       "num_cayley_neumann_terms": "num_cayley_neumann_terms", "coft": "coft", "eps": "eps"},
        neutral=("module_dropout", "init_weights"),
    )

    def param_specs(d_in, d_out, cfg):
        want = cfg.oft_block_size or cfg.r
        got = nearest_divisor(d_in, want)
        if got != want:
            knob = "oft_block_size" if cfg.oft_block_size else "r"
            warnings.warn(f"oft {knob}={want} does not divide d_in={d_in}; using {got} for this layer (PEFT's rule).")
        n_blocks = d_in // got if cfg.oft_block_size else got
        b = d_in // n_blocks
        if b < 2:
            raise ll.ConfigError(
                f"oft blocks of size 1 on a layer with d_in={d_in} have no rotation parameters; "
                "use fewer blocks (smaller r) or a larger oft_block_size."
            )
        return {"lora_R": ll.ParamSpec((n_blocks, b * (b - 1) // 2), init="zeros")}

    def init(layer, cfg):
        n_blocks, n_elements = layer.lora_R.shape
        b = (1 + math.isqrt(1 + 8 * n_elements)) // 2  # n_elements = b (b - 1) / 2
        rows, cols = torch.triu_indices(b, b, 1, device=layer.lora_R.device)
        layer.register_buffer("lora_triu", rows * b + cols, persistent=False)
        layer.lora_neumann = cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann else None
        layer.lora_coft_radius = cfg.eps / n_blocks**0.5 if cfg.coft else None

    def forward_input(layer, x):
        vec = layer.lora_R
        if layer.lora_coft_radius is not None:
            with torch.no_grad():  # Q_F = sqrt(2) |vec|: scale each block back into the ball
                norm = vec.float().norm(dim=1, keepdim=True) * 2**0.5
                vec.mul_(torch.where(norm > layer.lora_coft_radius, layer.lora_coft_radius / norm, 1.0).to(vec.dtype))
        n, b = vec.shape[0], x.shape[-1] // vec.shape[0]
        # build R in (at least) fp32 from the small parameter; only R is cast to x's dtype
        upper = vec.new_zeros(n, b * b, dtype=torch.promote_types(x.dtype, torch.float32))
        upper[:, layer.lora_triu] = vec.to(upper.dtype)
        upper = upper.view(n, b, b)
        rot = cayley(upper - upper.transpose(1, 2), layer.lora_neumann).to(x.dtype)
        blocks = x.reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b): one batched matmul over blocks
        return torch.bmm(blocks, rot).transpose(0, 1).reshape(x.shape)

    def merge(layer, weight, bias):
        # the input transform is linear, x' = x F with F = forward_input(I): W' = W F^T
        eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        return weight @ OFT.forward_input(layer, eye).T, bias

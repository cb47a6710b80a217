"""BOFT: orthogonal finetuning by butterfly factorization (Liu, Qiu, Feng, Xiu, Xue, Yu, Feng,
Liu, Heo, Peng, Wen, Black, Weller, Schölkopf 2024, https://arxiv.org/abs/2311.06243), as PEFT's
``tuners/boft`` computes it.

The frozen layer sees a rotated input and its output (less the bias) is scaled per channel::

    y' = s * (W x' + b - b) + b = s * (W x') + b,      x' = x B   (rows)
    B  = M_{m-1} ... M_1 M_0,                          M_i = P_i D_i P_i^T

``m`` is ``boft_n_butterfly_factor``, ``D_i`` block-diagonal with ``boft_block_num`` orthogonal
blocks of size ``boft_block_size`` (``num * size = d_in``), ``P_i`` the butterfly permutation
of factor i (PEFT's ``block_butterfly_perm``: inside each group of ``size * 2^i`` inputs, the
half-blocks of ``size / 2`` are reordered evens first, then odds; ``P_0 = I``), and ``s`` the
trainable ``(d_out, 1)`` output scale. Each block is the Cayley transform of the skew part of
a free ``b x b`` matrix ``R`` (PEFT's ``boft_R`` layout ``(m, num, b, b)``)::

    S = (R - R^T) / 2,     D = (I - S)(I + S)^-1

Identity at init: ``R = 0`` and ``s = 1`` (PEFT's default init), so every block is ``I``
exactly, ``B = I`` and ``y' = y`` bit for bit. The first gradient is not zero: ``dD/dS = -2``
at 0, so ``R`` receives the skew part of ``-(x^T dL/dx')`` per block.

The hot path never builds the ``d_in x d_in`` matrix ``B`` (PEFT does, then ``x @ B``): for
each factor it gathers the permuted input (one index, permutations of consecutive factors
folded into one) and rotates it block by block with one ``torch.bmm``; the scale is one
fused ``addcmul`` on the output. ``merge`` is ``W' = s * (W B^T)``, ``B = forward_input(I)``.

PEFT computes factor products (``m > 1``) only with its CUDA extension (``fbd_cuda``); when
the extension cannot be built (any CPU machine, or no ninja), PEFT warns and silently trains
with ``m = 1``. Here ``m`` always means what the config says, on every device; the parity
tests give PEFT a pure-torch stand-in for the extension to compare ``m = 2, 3``.

PEFT format (``lora_lite.export_peft`` / ``import_peft``): PEFT's ``BOFT`` adapter,
``lora_R`` / ``lora_s`` as ``boft_R`` / ``boft_s`` (same shapes), ``boft_block_size``,
``boft_block_num`` and ``boft_n_butterfly_factor`` as PEFT's keys. Import accepts
``boft_dropout``, ``init_weights`` and ``fan_in_fan_out`` whatever their values and refuses
``bias`` other than ``"none"`` (trained base biases). A file with ``boft_n_butterfly_factor
> 1`` means what it says in both libraries only where PEFT has its ``fbd_cuda`` extension
(see above: without it PEFT computes one factor). PEFT's BOFT takes ``nn.Linear`` (and
Conv2d), not transformers ``Conv1D``: a GPT-2 export does not load there.

Not implemented: ``boft_dropout`` (PEFT's multiplicative dropout that swaps random blocks for
``I`` while training; it is off by default) and Conv2d layers (lora-lite targets linear-like
layers here). ``r`` and ``alpha`` are not used.

Layers: any linear-like layer lora-lite targets, ``nn.Linear``, transformers ``Conv1D`` and
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` included: BOFT rotates the input and scales
the output, it never reads the weight (the bias, if any, is read to keep it unscaled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import lora_lite as ll


@dataclass
class BOFTConfig(ll.LoraLiteConfig):
    variant: str = "boft"
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1

    r_min: ClassVar[int] = 0

    def validate(self):
        if self.boft_block_size < 0 or self.boft_block_num < 0 or (self.boft_block_size > 0) == (self.boft_block_num > 0):
            raise ll.ConfigError(
                "boft takes boft_block_size or boft_block_num, exactly one of them non-zero (and neither negative), "
                f"since boft_block_size * boft_block_num = d_in; got boft_block_size={self.boft_block_size}, "
                f"boft_block_num={self.boft_block_num}. Set the other to 0 (PEFT's default: 4 and 0)."
            )
        if self.boft_n_butterfly_factor < 1:
            raise ll.ConfigError(
                f"boft_n_butterfly_factor must be >= 1 (1 is plain block-diagonal OFT), got {self.boft_n_butterfly_factor}."
            )


def layer_shape(d_in: int, cfg: BOFTConfig) -> tuple[int, int, int]:
    """``(factors m, blocks per factor, block size)`` for one layer, refusing what PEFT refuses."""
    m, extra = cfg.boft_n_butterfly_factor, cfg.boft_n_butterfly_factor - 1
    if cfg.boft_block_num:
        num = cfg.boft_block_num
        if d_in % num:
            raise ll.ConfigError(f"boft: d_in={d_in} is not divisible by boft_block_num={num}.")
        if extra and (num % 2**extra or 2**extra > num):
            raise ll.ConfigError(
                f"boft: boft_block_num={num} must be a multiple of 2^(boft_n_butterfly_factor - 1) = {2**extra}."
            )
        size = d_in // num
    else:
        size = cfg.boft_block_size
        if d_in % size:
            raise ll.ConfigError(f"boft: d_in={d_in} is not divisible by boft_block_size={size}.")
        if extra and d_in % (size * 2**extra):
            raise ll.ConfigError(
                f"boft: d_in={d_in} is not divisible by boft_block_size * 2^(boft_n_butterfly_factor - 1) = "
                f"{size * 2**extra}; use a smaller boft_n_butterfly_factor or block size."
            )
        num = d_in // size
    if extra and (num % 2 or size % 2):
        raise ll.ConfigError(
            f"boft: with boft_n_butterfly_factor > 1 the block number and size must be even; got {num} blocks of {size} "
            f"on d_in={d_in}."
        )
    if size < 2:
        raise ll.ConfigError(f"boft: blocks of size 1 (d_in={d_in}) cannot rotate; use a larger boft_block_size.")
    return m, num, size


def butterfly_perm(d_in: int, num: int, size: int, factor: int) -> torch.Tensor:
    """``idx`` with ``P[k, idx[k]] = 1``: factor ``factor``'s permutation (PEFT's ``block_butterfly_perm``)."""
    group = size * 2**factor  # inputs per group: num / 2^factor groups
    half = size // 2
    chunks = torch.arange(group // half)
    order = torch.cat([chunks[0::2], chunks[1::2]])  # half-blocks: evens first, then odds
    within = (order[:, None] * half + torch.arange(half)).reshape(-1)
    starts = torch.arange(0, d_in, group)
    return (starts[:, None] + within).reshape(-1)


def cayley(raw: torch.Tensor) -> torch.Tensor:
    """Orthogonal blocks ``(I - S)(I + S)^-1``, ``S`` the skew part of ``raw`` (..., b, b)."""
    skew = 0.5 * (raw - raw.transpose(-1, -2))
    eye = torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


class BOFT:
    name = "boft"
    config_class = BOFTConfig
    size_knob = "boft_block_size"
    # PEFT's BOFT: boft_R / boft_s one to one, the three shape knobs under PEFT's names
    peft = ll.PeftFormat(
        {"lora_R": "boft_R", "lora_s": "boft_s"},
        {"bias": "none"},
        peft_type="BOFT",
        config_fields={"boft_block_size": "boft_block_size", "boft_block_num": "boft_block_num",
                       "boft_n_butterfly_factor": "boft_n_butterfly_factor"},
        # fan_in_fan_out: PEFT forces it False on nn.Linear (the only linear kind its BOFT takes)
        neutral=("boft_dropout", "init_weights", "fan_in_fan_out"),
    )

    def param_specs(d_in, d_out, cfg):
        m, num, size = layer_shape(d_in, cfg)
        return {
            "lora_R": ll.ParamSpec((m, num, size, size), init="zeros"),
            # bf16 spacing near 1.0 (2^-7) would swallow small steps of the scale
            "lora_s": ll.ParamSpec((d_out, 1), init="ones", keep_fp32=True),
        }

    def init(layer, cfg):
        m, num, size, _ = layer.lora_R.shape
        d_in = num * size
        # x @ P = x[:, inv], x @ P^T = x[:, idx]. x B = x P_{m-1} D_{m-1} P_{m-1}^T ... P_0 D_0 P_0^T:
        # the gather before the factor i rotation is P_{i+1}^T P_i (P_m := I), then P_0^T = I last
        idx = [butterfly_perm(d_in, num, size, i) if m > 1 else torch.arange(d_in) for i in range(m)]
        inv = [torch.argsort(p) for p in idx]
        gathers = [inv[m - 1]] + [idx[i + 1][inv[i]] for i in range(m - 2, -1, -1)]
        ident = torch.arange(d_in)
        used = tuple(not torch.equal(g, ident) for g in gathers)
        assert torch.equal(idx[0], ident)
        layer.register_buffer("lora_gather", torch.stack(gathers).to(layer.lora_R.device), persistent=False)
        layer.lora_gather_used = used  # per factor, from m-1 down to 0

    def forward_input(layer, x):
        raw = layer.lora_R
        m, num, size, _ = raw.shape
        # the (m * num) small solves in (at least) fp32; only the blocks are cast to x's dtype
        rot = cayley(raw.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)
        z = x.reshape(-1, num * size)
        for step, factor in enumerate(range(m - 1, -1, -1)):  # over the few butterfly factors only
            if layer.lora_gather_used[step]:
                z = z.index_select(1, layer.lora_gather[step])
            z = torch.bmm(z.view(-1, num, size).transpose(0, 1), rot[factor]).transpose(0, 1).reshape(-1, num * size)
        return z.reshape(x.shape)

    def forward(layer, x, y):
        s = layer.lora_s.view(-1)
        s = s if s.dtype == y.dtype else s.to(y.dtype)
        bias = layer.bias
        if bias is None:
            return y * s
        # s * (y - b) + b = y * s + b * (1 - s): one activation-sized op, the rest is (d_out,)
        bias = bias if bias.dtype == y.dtype else bias.to(y.dtype)
        return torch.addcmul(bias - bias * s, y, s)

    def merge(layer, weight, bias):
        # x' = x B with B = forward_input(I); y' = s * (W x') + b: W' = s * (W B^T), b unchanged
        eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        rot = BOFT.forward_input(layer, eye)
        return layer.lora_s.float() * (weight @ rot.T), bias

"""MiSS: matrix shard sharing (Kang & Yin 2024, https://arxiv.org/abs/2409.15371; first
published as "Bone: Block-Affine Adaptation"), as PEFT 0.21's ``MissConfig`` computes it.

The input features are cut into shards of width ``r`` (the last one zero-padded when ``r``
does not divide ``d_in``); every shard shares one trainable matrix ``D``::

    balance (PEFT init_weights=True):  y' = y + (sum_b x_b) D,            D: (r, d_out)
    mini    (PEFT init_weights="mini"): y' = y + (sum_b x_b) tile(D),      D: (r, mini_r),
                                        tile(D) = D repeated d_out / mini_r times along d_out
    bat     (PEFT init_weights="bat"):  W'_{o,i} = W_{o,i} (I + D_o) + D_o  for each r x r block
                                        (o, i) of W,                        D: (d_out / r, r, r)

with ``x_b`` the b-th shard of the input. As a weight update, balance adds ``D^T`` tiled along
the input (``delta[o, j] = D[j mod r, o]``), mini the same with ``D``'s columns repeated, bat
mixes each r x r block of the frozen weight by the block row's own ``D_o`` (the "block
affine" update, the one mode that reads ``W``: its hook forms the dense ``delta`` once per
call, ``d_out x d_in`` numbers, never per token).

Identity at init: ``D = 0`` in every mode (PEFT's default), so the update is exactly zero.
The gradient of ``D`` is ``(sum_b x_b)^T g`` (balance, mini) or includes ``W``'s blocks
(bat), non-zero at ``D = 0``. No scale: ``alpha`` is unused, as in PEFT.

Layers: balance and mini never read the weight, so any linear-like layer (``nn.Linear``,
transformers ``Conv1D``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) works as it is. bat
reads it through ``lora_lite.dense_weight`` on every forward: exact on any kind lora-lite
can read, a dequantization per call on bitsandbytes layers (PEFT refuses bat on backends
without dequantization); storage nothing can read raises ``WeightAccessError`` at attach.

PEFT format (``lora_lite.export_peft`` / ``import_peft``): PEFT's ``MISS`` adapter, ``D``
as ``miss_block`` (PEFT's shape in each mode), ``r`` and ``mini_r`` as PEFT's keys, ``mode``
as ``init_weights`` (PEFT's spelling: balance is ``True``; import reads ``True`` and
``False``, a random start of the same layout, as ``"balance"``, and ``mini_r`` in mini mode
only, as PEFT does). ``miss_dropout`` is accepted whatever its
value; ``bias`` other than ``"none"`` (trained base biases) is refused.

Not implemented from PEFT: ``init_weights=False`` (kaiming-random ``D``, a test-only
non-identity start), ``miss_dropout`` (lora-lite variants take no dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import lora_lite as ll


def _knobs_of_peft(c: dict) -> dict:
    """PEFT's MISS config -> knobs: ``init_weights`` True (zeros) or False (random start) is the
    balance layout; PEFT writes ``mini_r`` in every mode and reads it in mini mode only."""
    mode = "balance" if isinstance(c.get("init_weights", True), bool) else c["init_weights"]
    return {"mode": mode, "mini_r": c.get("mini_r", 1) if mode == "mini" else 1}


@dataclass
class MissConfig(ll.LoraLiteConfig):
    """``r``: shard width along the input (PEFT's ``r``); ``mode``: PEFT's ``init_weights``
    (``"balance"`` = ``True``, ``"bat"``, ``"mini"``); ``mini_r``: the column count of ``D``
    in mini mode (must divide every target's ``d_out``)."""

    variant: str = "miss"
    mode: Literal["balance", "bat", "mini"] = "balance"
    mini_r: int = 1

    def validate(self):
        if self.mini_r < 1:
            raise ll.ConfigError(f"miss mini_r must be a positive integer, got {self.mini_r}.")
        if self.mode != "mini" and self.mini_r != 1:
            raise ll.ConfigError(
                f"miss mini_r={self.mini_r} only applies to mode='mini' (got mode={self.mode!r}); "
                "leave it at 1 or set mode='mini'."
            )


def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """``sum_b x_b``: the input's r-wide shards added, the last one zero-padded."""
    pad = -x.shape[-1] % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (-1, r)).sum(-2)


def bat_delta(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``delta`` with block ``(o, i)`` equal to ``W_{o,i} D_o + D_o`` (``w``: (d_out, d_in), ``d``: (d_out/r, r, r))."""
    n_out, r, _ = d.shape
    w4 = w.reshape(n_out, r, -1, r)  # (block row o, row in block, block column i, column in block)
    return (torch.matmul(w4.transpose(1, 2), d[:, None]) + d[:, None]).transpose(1, 2).reshape(w.shape)


class MiSS:
    name = "miss"
    additive = True  # y + delta(x): rows of a batch may use different attachments
    config_class = MissConfig
    # PEFT's MISS: D as miss_block (same shape in every mode), mode as init_weights
    peft = ll.PeftFormat(
        {"lora_D": "miss_block"},
        {"bias": "none"},
        peft_type="MISS",
        config_fields={"r": "r", "mini_r": "mini_r", "mode": "init_weights"},
        neutral=("miss_dropout",),
        # PEFT spells balance init_weights=True (False: a random start of the same layout)
        config_of=lambda cfg: {"init_weights": True if cfg.mode == "balance" else cfg.mode},
        knobs_of=lambda c: _knobs_of_peft(c),
    )
    lrs = (3e-5, 1e-4, 3e-4, 1e-3)  # every entry of D acts on a sum of d_in / r input shards
    size_knob = "r"  # D has r * d_out numbers (balance), d_out * r (bat), r * mini_r (mini)

    def param_specs(d_in, d_out, cfg):
        r = cfg.r
        if r > d_in:
            raise ll.ConfigError(f"miss r={r} exceeds a target's d_in={d_in} (r is the shard width along the input).")
        if cfg.mode == "bat":
            if d_in % r or d_out % r:
                raise ll.ConfigError(
                    f"miss mode='bat' needs r to divide both d_in and d_out to cut W into r x r blocks; "
                    f"a target is {d_out} x {d_in} and r={r}."
                )
            shape = (d_out // r, r, r)
        elif cfg.mode == "mini":
            if d_out % cfg.mini_r:
                raise ll.ConfigError(
                    f"miss mode='mini' needs mini_r to divide d_out (D's columns are tiled along the output); "
                    f"a target has d_out={d_out} and mini_r={cfg.mini_r}."
                )
            shape = (r, cfg.mini_r)
        else:
            shape = (r, d_out)
        return {"lora_D": ll.ParamSpec(shape, init="zeros")}

    def forward(layer, x, y):
        d = layer.lora_D
        if d.dtype != x.dtype:
            d = d.to(x.dtype)
        if d.dim() == 3:  # bat: the update depends on W, formed once per call at (d_out, d_in)
            w = ll.dense_weight(layer)
            return y + F.linear(x, bat_delta(w.to(x.dtype), d))
        u = shard_sum(x, d.shape[0]) @ d
        if u.shape[-1] != y.shape[-1]:  # mini: the narrow product, tiled along the output
            u = u.repeat(*(1,) * (u.dim() - 1), y.shape[-1] // u.shape[-1])
        return y + u

    def merge(layer, weight, bias):
        d = layer.lora_D.float()
        d_out, d_in = weight.shape
        if d.dim() == 3:
            return weight + bat_delta(weight, d), bias
        if d.shape[1] != d_out:
            d = d.repeat(1, d_out // d.shape[1])
        r = d.shape[0]
        # delta[o, j] = D[j mod r, o]: D^T tiled along the input, cut to d_in
        return weight + d.T.repeat(1, -(-d_in // r))[:, :d_in], bias

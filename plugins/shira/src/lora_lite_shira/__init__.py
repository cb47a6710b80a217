"""SHiRA: sparse high rank adapters (Bhardwaj et al. 2024, https://arxiv.org/abs/2406.13175).

Each target trains ``k = r (d_in + d_out)`` values ``v`` (as many as a rank-r LoRA) at ``k``
fixed entries ``(i_m, j_m)`` of the weight, a sparse mask chosen once; every other entry of
the weight stays frozen::

    dW = zeros(d_out, d_in);  dW[i_m, j_m] = v_m
    y' = y + x dW^T      (= x (W + dW)^T + b, PEFT's form)

``dW`` is sparse but not low rank: with a random mask it is full rank almost surely.

Mask (``mask_type="random"``, PEFT's only built-in one): ``torch.randperm(d_out * d_in)`` on a
CPU ``torch.Generator`` seeded with ``random_seed`` (``None``: a fresh generator's fixed
default seed, as PEFT), first ``k`` flat positions; the values are ordered as PEFT's
``torch.where(mask)``, i.e. the positions sorted row-major. The positions are stored as PEFT
stores them, a persistent, non-trainable int32 tensor ``lora_index`` of shape ``(2, k)`` (row
indices, then column indices: PEFT's ``shira_indices``), so a checkpoint reloads the mask it
was trained with (no RNG state needed, and a mask edited by hand or by another rule is
kept); ``init`` redraws the same positions at load and the saved ones are copied over them.

Identity at init: ``v = 0`` (PEFT's ``init_weights=True``, its default), so ``dW = 0`` exactly.

Hot path (``merged_forward``): ``dW`` scattered into a dense ``(d_out, d_in)`` matrix; on
``nn.Linear`` and GPT-2's ``Conv1D`` core runs the layer as ONE matmul on ``W + dW`` (the
``merge`` hook, differentiable in ``v``), as PEFT's layer does. The ``forward`` hook, ``y + x
dW^T`` after the base's own matmul, serves quantized layers, stacked attachments and mixed
batches. A gather/scatter form (``x[..., cols] * v`` added into ``rows``) is exact too but
measured 10-25x slower than the dense matmul on CPU (d 64-1536, k = r (d_in + d_out)), and
the hook form 1.44x PEFT's train step on the bench's small shape (a second full matmul
forward and backward). ``alpha`` is not used: PEFT's ``scaling`` is fixed at 1 for training.

Layers: any linear-like layer (``nn.Linear``, transformers ``Conv1D``, bitsandbytes 4/8-bit):
the update is added to the base output and the weight is never read.

PEFT format (``ll.export_peft`` / ``ll.import_peft``): PEFT's ``SHIRA`` adapter, the values as
``shira_weight`` and the mask as ``shira_indices`` (PEFT saves the indices and its load uses
them instead of redrawing the mask; both copied bit for bit), ``r`` and ``random_seed`` under the
same names. So a custom mask (PEFT's user ``mask_fn``, or one written into ``lora_index``) goes
across both ways. ``mask_type`` and ``init_weights`` are accepted whatever their value (the
file's indices and values define the adapter); export writes ``mask_type="random"``, under
which PEFT still loads the saved indices. Import refuses ``fan_in_fan_out`` and anything else it
does not model.

Not implemented from PEFT: a user ``mask_fn`` set on the config object (a function is not
part of a serialisable config; write a custom mask into ``lora_index`` after attach instead:
it is saved with the checkpoint), ``set_scale`` (inference-time scaling; scale ``v``
instead), ``fan_in_fan_out`` (the layer kind says how the weight is stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll


@dataclass
class SHiRAConfig(ll.LoraLiteConfig):
    variant: str = "shira"
    mask_type: Literal["random"] = "random"
    random_seed: int | None = None

    def validate(self):
        if self.random_seed is not None and self.random_seed < 0:
            raise ll.ConfigError(f"shira random_seed must be None or >= 0 (a torch.Generator seed), got {self.random_seed}.")


def random_mask(d_out: int, d_in: int, k: int, seed: int | None) -> torch.Tensor:
    """PEFT's random mask as its ``shira_indices``: the first k of a seeded permutation of the
    flat positions, sorted, as int32 ``(2, k)`` rows and columns."""
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=g)[:k].sort().values
    return torch.stack([flat // d_in, flat % d_in]).to(torch.int32)


def _delta(layer, d_out: int, d_in: int, dtype: torch.dtype) -> torch.Tensor:
    values = layer.lora_shira_weight
    if values.dtype != dtype:
        values = values.to(dtype)
    rows, cols = layer.lora_index
    return values.new_zeros(d_out, d_in).index_put((rows, cols), values)


class SHiRA:
    name = "shira"
    additive = True  # y + delta(x): rows of a batch may use different attachments
    config_class = SHiRAConfig
    merged_forward = True  # dW is dense: one matmul on W + dW (as PEFT), not the base matmul plus x dW^T
    # PEFT's SHiRA: values and indices per layer, both saved (PEFT's load uses the saved indices)
    peft = ll.PeftFormat(
        {"lora_shira_weight": "shira_weight", "lora_index": "shira_indices"}, {"fan_in_fan_out": False},
        peft_type="SHIRA", config_fields={"r": "r", "random_seed": "random_seed"},
        neutral=("mask_type", "init_weights"),
    )

    def param_specs(d_in, d_out, cfg):
        k = cfg.r * (d_in + d_out)
        if k > d_in * d_out:
            raise ll.ConfigError(
                f"shira r={cfg.r} gives r * (d_in + d_out) = {k} values, more than the {d_out} x {d_in} = "
                f"{d_in * d_out} entries of a target's weight; lower r or narrow the targets."
            )
        return {
            "lora_shira_weight": ll.ParamSpec((k,), init="zeros"),
            # placeholder, replaced in init by the int32 (row, column) positions (ParamSpec tensors are floating)
            "lora_index": ll.ParamSpec((2, k), init="empty", trainable=False),
        }

    def init(layer, cfg, targets):
        t = next(t for t in targets if t.layer is layer)
        idx = random_mask(t.d_out, t.d_in, layer.lora_shira_weight.numel(), cfg.random_seed)
        layer.lora_index = nn.Parameter(idx.to(layer.lora_shira_weight.device), requires_grad=False)

    def forward(layer, x, y):
        return y + F.linear(x, _delta(layer, y.shape[-1], x.shape[-1], x.dtype))

    def merge(layer, weight, bias):
        # W' = W + dW: exactly what forward adds
        return weight + _delta(layer, weight.shape[0], weight.shape[1], weight.dtype), bias

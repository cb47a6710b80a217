"""VB-LoRA: low-rank factors composed from a shared vector bank (Li et al. 2024, https://arxiv.org/abs/2405.15179).

Paper: Y. Li, S. Han, S. Ji, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector
Banks", NeurIPS 2024.

One trainable bank ``V: (num_vectors, L)`` (``L = vector_length``) serves every target of the
attachment. Each layer's LoRA factors ``A: (r, d_in)``, ``B: (d_out, r)`` are cut into
sub-vectors of length ``L``, and each sub-vector is a top-k mixture of bank vectors, chosen
and weighted by that sub-vector's own trainable logits ``z: (num_vectors,)``::

    v = sum_{j in topk(z)} softmax(z_topk)_j V_j
    A[k, c L:(c+1) L] = v(lora_logits_A[k, c]),    lora_logits_A: (r, d_in / L, num_vectors)
    B[c L:(c+1) L, k] = v(lora_logits_B[c, k]),    lora_logits_B: (d_out / L, r, num_vectors)
    y' = y + B A x - B0 A0 x

exactly PEFT's ``_get_low_rank_matrix`` and layout (no ``alpha / r`` scale, as PEFT). PEFT refuses
a layer whose ``d_in`` or ``d_out`` is not a multiple of ``L``; here such a layer gets
``ceil(d / L)`` sub-vectors and the last one is cut to length (``A[:, :d_in]``, ``B[:d_out]``),
so one bank serves any mix of widths (odd vocabularies, small heads). Where ``L`` divides
both widths this is PEFT's layer exactly.

Identity at init (``B0 A0``): PEFT's VB-LoRA is not the identity at init: the bank is uniform in
``+-init_vector_bank_bound`` and the logits normal with std ``init_logits_std``, and a top-k
mixture is a convex combination of bank vectors, so neither factor can start at zero (and a
zero bank would give no gradient to anything). We subtract the initial product instead:
``A0``, ``B0`` are the factors at init, frozen, so ``y' = y`` exactly at init, and the gradients
of the logits and the bank are PEFT's (the offset is a constant): this is PEFT's VB-LoRA on the
base ``W - B0 A0``. ``A0``, ``B0`` are not saved: the initial bank and logits are drawn from CPU
``torch.Generator``s seeded from ``init_seed`` (the bank from ``init_seed``, target ``i``'s logits
from ``init_seed`` and ``i``), so ``load`` regenerates them exactly and the checkpoint holds only
the bank and the logits, as PEFT's. They cost ``r (d_in + d_out)`` fp32 values of memory per
layer (a LoRA's worth). The call runs ``B A x - B0 A0 x`` as ONE rank-``2r`` product,
``[B - B0, B0] ([A; A - A0] x)`` (``lora_lite.functional.offset_low_rank_update``, exactly zero at
init): two matmuls, as PEFT's call, not four (bench, tiny shape, train step on q/v / all
linears: 1.02/1.10x PEFT with four, 1.01/1.00x with two, on a loaded machine). ``subtract_init=False`` gives
PEFT's function unchanged (not the identity at init; for parity, or to continue a PEFT run).

The bank is created by the first target's ``init``, as ``plugins/vera`` creates its shared
projections, but, being trainable, it is registered as a parameter on that target only
(``<first target>.lora_vector_bank``, saved once, as PEFT saves it); every other target
declares ``lora_vector_bank`` as an empty frozen placeholder and reaches the one bank through a
plain reference (``layer.lora_bank``, a 1-tuple: no second registration). Registering the same
trainable ``nn.Parameter`` on every target, as vera does with its frozen pair, would list it
once in ``model.named_parameters()`` but once per target in ``Attachment.adapter_tensors()``
and ``trainable_parameters()`` (an optimizer built from those would step it once per target).
``model.to()`` converts the parameter in place, so the references stay valid.

dtype: the bank and the logits are stored in fp32 whatever ``cfg.dtype`` (``keep_fp32``): logits
~0.1 have a bf16 spacing of 2^-11 ~ 5e-4, so lr-1e-4 steps round to nothing; the factors are
computed in fp32 and cast to the activation dtype.

Layers: any linear-like layer, quantized ones included: the base weight is never read.

PEFT format (``lora_lite.export_peft`` / ``import_peft``): PEFT's ``VBLORA``, ``vblora_logits_A`` /
``vblora_logits_B`` per target (the same shapes) and the bank once, as ``base_model.vblora_vector_bank``;
``r``, ``num_vectors``, ``vector_length``, ``topk``, ``init_vector_bank_bound``, ``init_logits_std``
under PEFT's names. PEFT's function is ``subtract_init=False``: only such an attachment exports
(``subtract_init=True``, the default, is PEFT's VB-LoRA on ``W - B0 A0``, a base PEFT does not have:
``export_peft(..., as_lora=True)`` writes it as a plain LoRA), and import attaches with
``subtract_init=False``. Export also refuses a layer whose width ``vector_length`` does not divide
(PEFT refuses such layers). Import refuses ``save_only_topk_weights`` (other tensors), a ``bias``
other than ``"none"``, ``fan_in_fan_out`` and ``modules_to_save``; ``vblora_dropout`` is accepted
and not modelled. ``init_seed`` is not PEFT's (it only draws the init).

Not implemented: ``vblora_dropout``, ``bias`` training, ``fan_in_fan_out`` (core's layer kinds
give ``(d_out, d_in)``), and ``save_only_topk_weights`` (PEFT's inference-only checkpoint of top-k
indices and weights: the full logits are what training needs, and a load of it cannot resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll
from lora_lite.functional import low_rank_update, offset_low_rank_merge, offset_low_rank_update


@dataclass
class VBLoRAConfig(ll.LoraLiteConfig):
    variant: str = "vblora"
    r: int = 4  # PEFT's default
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    init_seed: int = 0
    subtract_init: bool = True

    def validate(self):
        for knob in ("num_vectors", "vector_length", "topk"):
            if getattr(self, knob) < 1:
                raise ll.ConfigError(f"vblora {knob} must be >= 1, got {getattr(self, knob)}.")
        if self.topk > self.num_vectors:
            raise ll.ConfigError(f"vblora topk={self.topk} exceeds num_vectors={self.num_vectors}.")
        if self.init_vector_bank_bound <= 0:
            raise ll.ConfigError(
                f"vblora init_vector_bank_bound must be > 0, got {self.init_vector_bank_bound}: a zero bank makes both "
                "factors zero and no tensor ever gets a gradient."
            )
        if self.init_logits_std < 0:
            raise ll.ConfigError(f"vblora init_logits_std must be >= 0, got {self.init_logits_std}.")


_STRIDE = 1_000_003  # seed of target i's logits: init_seed * _STRIDE + i + 1 (the bank: init_seed * _STRIDE)


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """``(..., num_vectors)`` logits -> ``(..., L)``: the softmax-weighted top-k bank vectors."""
    top, idx = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)


def factors(layer, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in fp32: ``A (r, d_in)``, ``B (d_out, r)``, PEFT's layout."""
    za, zb = layer.lora_logits_A, layer.lora_logits_B
    bank, k = layer.lora_bank[0].to(za.device), layer.lora_cfg.topk
    a = mix(za, bank, k).reshape(za.shape[0], -1)
    b = mix(zb, bank, k).transpose(1, 2).reshape(-1, zb.shape[1])
    # a width that L does not divide: the last sub-vector is cut (a no-op where L divides it)
    return a[:, :d_in], b[:d_out]


def _to_peft(layer, cfg, tensors):
    """Export: the tensors as they are, for PEFT's function only (``subtract_init=False``) and
    widths ``vector_length`` divides."""
    if cfg.subtract_init:
        raise ll.PeftInteropError(
            "vblora with subtract_init=True (the default) is PEFT's VB-LoRA on the base W - B0 A0, which PEFT's "
            "format cannot express. Export it with lora_lite.export_peft(model, dir, as_lora=True) (a plain LoRA of "
            "its weight deltas), or train with subtract_init=False (PEFT's own function)."
        )
    kind = ll.layer_kind(layer)
    d_in, d_out = kind.features(layer) if kind is not None else (None, None)
    ln = cfg.vector_length
    if d_in is None or d_in % ln or d_out % ln:
        raise ll.PeftInteropError(
            f"vblora: PEFT's VB-LoRA needs vector_length={ln} to divide both widths of every target, and a target is "
            f"{d_in} -> {d_out}; export it with as_lora=True, or attach with a vector_length that divides them."
        )
    return tensors, cfg.r, cfg.alpha


class VBLoRA:
    name = "vblora"
    config_class = VBLoRAConfig
    additive = True  # y + delta(x)
    lrs = (1e-3, 3e-3, 1e-2, 3e-2)  # a shared bank of tiny vectors and mixing logits: PEFT's examples train at ~1e-2
    # PEFT's VBLORA: logits per target, the bank once; PEFT's function is subtract_init=False
    peft = ll.PeftFormat(
        {"lora_logits_A": "vblora_logits_A", "lora_logits_B": "vblora_logits_B"},
        {"fan_in_fan_out": False, "bias": "none", "save_only_topk_weights": False},
        convert=_to_peft,
        peft_type="VBLORA",
        config_fields={knob: knob for knob in ("r", "num_vectors", "vector_length", "topk", "init_vector_bank_bound",
                                               "init_logits_std")},
        shared={"lora_vector_bank": "base_model.vblora_vector_bank"},
        neutral=("vblora_dropout",),
        knobs_of=lambda config: {"subtract_init": False},
        importable=True,
    )

    def param_specs(d_in, d_out, cfg):
        n, ln = cfg.num_vectors, cfg.vector_length
        n_in, n_out = -(-d_in // ln), -(-d_out // ln)  # ceil: a last, shorter sub-vector
        frozen = {"init": "empty", "trainable": False, "persistent": False, "keep_fp32": True}
        return {
            "lora_logits_A": ll.ParamSpec((cfg.r, n_in, n), init="empty", keep_fp32=True),
            "lora_logits_B": ll.ParamSpec((n_out, cfg.r, n), init="empty", keep_fp32=True),
            # placeholder; on the first target init replaces it by the attachment's one trainable bank
            "lora_vector_bank": ll.ParamSpec((0,), init="empty", trainable=False, keep_fp32=True),
            # the factors at init, subtracted so that the adapter starts as the identity
            "lora_A0": ll.ParamSpec((cfg.r, d_in) if cfg.subtract_init else (0,), **frozen),
            "lora_B0": ll.ParamSpec((d_out, cfg.r) if cfg.subtract_init else (0,), **frozen),
        }

    def init(layer, cfg, targets):
        first = targets[0].layer
        device = layer.lora_logits_A.device
        if layer is first:
            g = torch.Generator(device="cpu").manual_seed(cfg.init_seed * _STRIDE)
            bank = torch.empty(cfg.num_vectors, cfg.vector_length)
            bank.uniform_(-cfg.init_vector_bank_bound, cfg.init_vector_bank_bound, generator=g)
            first.lora_vector_bank = nn.Parameter(bank.to(device))
        # a plain reference, not a registration: the bank is a parameter of the first target only
        layer.lora_bank = (first.lora_vector_bank,)
        i, target = next((i, t) for i, t in enumerate(targets) if t.layer is layer)
        g = torch.Generator(device="cpu").manual_seed(cfg.init_seed * _STRIDE + i + 1)
        with torch.no_grad():
            for z in (layer.lora_logits_A, layer.lora_logits_B):
                z.copy_(torch.empty(z.shape).normal_(0.0, cfg.init_logits_std, generator=g))
            if cfg.subtract_init:
                a0, b0 = factors(layer, target.d_out, target.d_in)
                layer.lora_A0.copy_(a0)
                layer.lora_B0.copy_(b0)

    def forward(layer, x, y):
        a, b = factors(layer, y.shape[-1], x.shape[-1])
        if layer.lora_cfg.subtract_init:  # one rank-2r product, exactly zero at init (see offset_low_rank_update)
            return offset_low_rank_update(x, a, b, layer.lora_A0, layer.lora_B0, 1.0, y)
        return low_rank_update(x, a, b, 1.0, y)

    def merge(layer, weight, bias):
        a, b = factors(layer, *weight.shape)
        if layer.lora_cfg.subtract_init:
            return offset_low_rank_merge(weight, a, b, layer.lora_A0, layer.lora_B0, 1.0).to(weight), bias
        return torch.addmm(weight, b.to(weight), a.to(weight)), bias

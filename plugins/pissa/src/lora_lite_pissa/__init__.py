"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024,
https://arxiv.org/abs/2404.02948).

With the SVD ``W = U S V^T`` and scale ``s = alpha / r``::

    A = sqrt(S_r / s) V_r^T,   B = U_r sqrt(S_r / s),   W_res = W - s B A
    y' = W_res x (+ b) + s B A x

The adapter starts on the top-r principal subspace and the frozen base keeps the
residual. Dividing ``S_r`` by ``s`` before the split (PEFT's convention) makes ``s B A``
equal the rank-r part exactly whatever ``alpha``.

Identity at init: ``W_res x + s B A x = (W - s B A) x + s B A x = W x`` up to float
rounding (~1e-6 relative in fp32).

``svd="full"`` runs ``torch.linalg.svd``; ``svd="lowrank"`` runs ``torch.svd_lowrank``
with ``niter`` subspace iterations (PEFT's ``pissa_niter_N``), much faster on wide
layers, seeded from ``seed`` so a reload reproduces the same ``W_res``.

Layers: every layer kind whose weight lora-lite can read and write (``nn.Linear``,
transformers ``Conv1D`` whose transposed storage ``lora_lite.dense_weight`` hides). The
base weight is rewritten through ``lora_lite.replace_dense_weight``, so ``detach``
restores the original storage bit for bit and ``save -> detach -> load`` is exact.

Quantized layers (bitsandbytes 4/8-bit) raise ``WeightAccessError`` by default: W_res
can only be stored by requantizing it. ``quantized="requantize"`` opts in: the SVD runs
on the dequantized weight ``W_q`` and ``W_res`` is stored requantized, so identity at
init holds only up to the requantization error ``Q(W_res) - W_res`` (of the order of
the layer's own quantization error). Each such layer records it as
``layer.lora_requant_error`` (max abs, relative to ``max |W_q|``) and a warning
points there.

PEFT format: ``export_peft`` writes the rank-``2r`` LoRA delta against the original base (as
PEFT's ``path_initial_model_for_weight_conversion`` does), which plain LoRA readers load.
``import_peft`` also reads a PEFT LoRA adapter saved with ``init_lora_weights="pissa"`` and no
conversion (the trained ``A``, ``B`` only), onto the ORIGINAL base: ``PeftModel.from_pretrained``
runs PiSSA's init on the base it is given (``W_res = W - s B0 A0`` from
``torch.linalg.svd`` of the fp32 weight) and then loads ``A``, ``B``; attaching ``pissa`` with
``svd="full"`` runs the same SVD on the same weight, so ``W_res`` is PEFT's to float rounding
(the rank-r part is unique wherever ``sigma_r > sigma_(r+1)``), and the file's ``A``, ``B``
are copied in. ``pissa_niter_*`` (PEFT's randomized SVD, drawn from the global RNG at load) is
refused: its ``W_res`` cannot be recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import warnings

import torch

import lora_lite as ll


@dataclass
class PiSSAConfig(ll.LoraLiteConfig):
    variant: str = "pissa"
    svd: Literal["full", "lowrank"] = "full"
    niter: int = 4
    seed: int = 0
    quantized: Literal["error", "requantize"] = "error"

    def validate(self):
        if self.niter < 0:
            raise ll.ConfigError(f"pissa niter must be >= 0, got {self.niter}.")


def _whole(w: torch.Tensor) -> torch.Tensor:
    """The full tensor in float64 on CPU (a sharded DTensor is gathered: every rank calls it)."""
    w = w.full_tensor() if callable(getattr(w, "full_tensor", None)) else w
    return w.detach().to("cpu", torch.float64)


def _as_lora_delta(layer, cfg, t):
    """PEFT export: the rank-2r LoRA equal to this adapter on W_res, against the original W
    (as PEFT's path_initial_model_for_weight_conversion writes PiSSA): A' = [A; A0],
    B' = [B, -B0], alpha' = 2 alpha, with s B0 A0 = W - W_res recovered exactly from the
    weight init replaced."""
    s, r = cfg.alpha / cfg.r, cfg.r
    u, sv, vh = torch.linalg.svd((_whole(ll.original_weight(layer)) - _whole(ll.dense_weight(layer))) / s,
                                 full_matrices=False)  # = B0 A0, rank r
    root = sv[:r].sqrt()
    a0, b0 = (root[:, None] * vh[:r]).to(t["lora_A"].dtype), (u[:, :r] * root).to(t["lora_B"].dtype)
    return {"lora_A": torch.cat([t["lora_A"], a0]), "lora_B": torch.cat([t["lora_B"], -b0], dim=1)}, 2 * r, 2 * cfg.alpha


class PiSSA:
    name = "pissa"
    config_class = PiSSAConfig
    # export: the delta against the original base (config_of: a plain LoRA); import: PEFT's
    # unconverted init_lora_weights="pissa" files, W_res recomputed by this variant's init
    peft = ll.PeftFormat({"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
                         {"use_dora": False, "init_lora_weights": "pissa"}, convert=_as_lora_delta,
                         config_of=lambda cfg: {"init_lora_weights": True}, importable=True)

    def param_specs(d_in, d_out, cfg):
        if cfg.r > min(d_in, d_out):
            raise ll.ConfigError(
                f"pissa r={cfg.r} exceeds min(d_in, d_out)={min(d_in, d_out)} of a target; "
                "lower r or narrow the targets."
            )
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="empty"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="empty"),
        }

    def init(layer, cfg):
        requantize = ll.is_quantized(layer)
        if requantize and cfg.quantized != "requantize":
            raise ll.WeightAccessError(
                f"pissa rewrites the base weight into W_res, and {type(layer).__name__} stores it quantized. "
                "Use lora/delora on quantized layers, dequantize the model before attaching pissa, or pass "
                "quantized='requantize' to store W_res requantized (identity at init then holds only up to "
                "the requantization error)."
            )
        scale = cfg.alpha / cfg.r
        w = ll.dense_weight(layer)
        w32 = w.detach().to(torch.float32)
        if cfg.svd == "full":
            u, s, vh = torch.linalg.svd(w32, full_matrices=False)
            u, s, vh = u[:, : cfg.r], s[: cfg.r], vh[: cfg.r]
        else:
            with torch.random.fork_rng(devices=[w32.device] if w32.is_cuda else []):
                torch.manual_seed(cfg.seed)
                u, s, v = torch.svd_lowrank(w32, q=cfg.r, niter=cfg.niter)
            vh = v.T
        root = torch.sqrt(s / scale)
        a = root[:, None] * vh
        b = u * root[None, :]
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            # subtract what the stored (possibly bf16-rounded) factors will add back, in one
            # fused addmm (three weight-sized passes as separate ops)
            a32, b32 = layer.lora_A.float(), layer.lora_B.float()
            w_res = torch.addmm(w32, b32, a32, alpha=-scale)
        ll.replace_dense_weight(layer, w_res.to(w.dtype), requantize=requantize)
        layer.lora_scaling = scale
        if requantize:
            err = (torch.addmm(ll.dense_weight(layer).float(), b32, a32, alpha=scale) - w32).abs().max() / w32.abs().max()
            layer.lora_requant_error = float(err)
            warnings.warn(
                "pissa stored W_res requantized: identity at init holds only up to the requantization error, "
                "recorded per layer as layer.lora_requant_error (max |W_res_q + s B A - W_q| / max |W_q|).",
                stacklevel=2,
            )

    def forward(layer, x, y):
        return ll.low_rank_update(x, layer.lora_A, layer.lora_B, layer.lora_scaling, y)

    def merge(layer, weight, bias):
        # W' = W + s B A, onto the current weight (PiSSA's W_res): exactly what forward adds
        return torch.addmm(weight, layer.lora_B.float(), layer.lora_A.float(), alpha=layer.lora_scaling), bias

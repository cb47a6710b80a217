"""CorDA: context-oriented decomposition adaptation (Yang et al. 2024,
https://arxiv.org/abs/2406.05223).

LoRA initialised from an SVD of the weight multiplied by the covariance of the layer's
inputs on calibration data, so the factors see which directions the task (or the
knowledge to keep) actually uses. With ``C`` the input covariance of a target (the mean
over calls of ``X^T X``, each call's inputs ``X`` divided by ``|max X|``, PEFT's
normalisation), damped to ``C' = C + d * mean(diag C) * I`` (``d`` from 0.01, doubled until
``||C' C'^-1 - I||_F < 0.05``)::

    W C' = U S Vh,    V = (Vh C'^-1)^T       so that W = U S V^T exactly
    ipm (instruction-previewed, default): the r largest triplets; kpm (knowledge-preserved): the r smallest
    A0 = sqrt(S_r / s) V_r^T,   B0 = U_r sqrt(S_r / s),   s = alpha / r

and the layer computes, with ``A``, ``B`` trainable from ``A0``, ``B0`` (frozen copies)::

    y' = W x (+ b) + s (B A - B0 A0) x

which is PEFT's ``W_res = W - s B0 A0`` plus ``s B A``, with the subtraction kept next to the
adapter instead of written into ``W``: ``load`` copies the saved tensors after every
attach-time hook has run, so a weight rewritten from calibrated factors could not be
rebuilt bit-exactly without the data (see NOTES-corda.md for the core hook that would allow
the rewrite). Cost: a second rank-r product per call. Gains: exact identity, exact reload
without data, quantized layers.

Identity at init: the hook subtracts two identical products, exactly zero, so ``y' = y``.

Calibration (``group_init``): one no-grad pass per batch in eval mode (quantized layers keep
their mode), forward hooks on the targets accumulate ``X^T X`` in float32 as PEFT does
(``(tokens, d_in)``: every token of the call, padding included, as PEFT). Dicts are called as
``model(**batch)``, tensors as ``model(batch)``.

Layers: every linear-like kind whose weight ``lora_lite.dense_weight`` reads (``nn.Linear``,
transformers ``Conv1D``, bitsandbytes 4/8-bit dequantized for the SVD); the weight is never
written. Not implemented from PEFT: per-layer ``rank_pattern``, the covariance/cache files,
``use_float16_for_covariance``, ``hooked_model``.

PEFT format: PEFT keeps ``W_res`` in the base model, so ``export_peft`` writes the rank-``2r``
LoRA delta against the original base, ``A' = [A; A0]``, ``B' = [B, -B0]``, ``alpha' = 2 alpha``,
``init_lora_weights: true`` (what PEFT's ``path_initial_model_for_weight_conversion`` writes;
exact: the saved factors concatenated). That file, and PEFT's own converted one, import as plain
``lora``. PEFT's unconverted files (``init_lora_weights: "corda"``) are refused on import: their
``W_res`` depends on calibration covariances the file does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import lora_lite as ll
from lora_lite.functional import (
    offset_low_rank_as_lora,
    offset_low_rank_merge,
    offset_low_rank_specs,
    offset_low_rank_update,
)


@dataclass
class CorDAConfig(ll.LoraLiteConfig):
    variant: str = "corda"
    corda_method: Literal["ipm", "kpm"] = "ipm"


def _capture(name, acc):
    def hook(module, args, output):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        peak = torch.max(x).abs()
        if not torch.isfinite(x).all() or peak == 0:
            raise ll.CalibrationError(f"corda: the inputs of {name} are not finite or all zero; check the data.")
        x = x / peak
        cov = x.T @ x
        n, total = acc.get(name, (0, 0))
        acc[name] = (n + 1, total + cov)

    return hook


def covariances(model, targets, calibration_data) -> dict[str, torch.Tensor]:
    """``{target name: (d_in, d_in) float32 mean over calls of X^T X / max|X|^2}``."""
    acc = {}
    ll.run_calibration(
        model, calibration_data, variant="corda", why="decomposes each weight against the covariance of its inputs",
        forward_hooks=[(t.host, _capture(t.name, acc)) for t in targets],
    )
    missing = [t.name for t in targets if t.name not in acc]
    if missing:
        raise ll.CalibrationError(f"corda: the calibration data never reached {missing[:3]}; exclude them or use other data.")
    return {name: total / n for name, (n, total) in acc.items()}


def _decompose(w: torch.Tensor, cov: torch.Tensor):
    """PEFT's collect_eigens_for_layer: U, S, V with W = U diag(S) V^T, from the SVD of W C'."""
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    for _ in range(40):
        fixed = cov + torch.diag(torch.ones(cov.shape[0], device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ll.CalibrationError("corda: the input covariance stays singular after damping; pass more varied data.")
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return u, s, (vh @ inv).T


class CorDA:
    name = "corda"
    config_class = CorDAConfig
    additive = True  # y + delta(x): rows of a batch may use different attachments
    # export: the delta against the original base (a plain LoRA of rank 2r); PEFT's unconverted
    # init_lora_weights="corda" files are refused on import (their W_res depends on calibration data)
    peft = ll.PeftFormat({"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
                         {"use_dora": False, "init_lora_weights": "corda"}, convert=offset_low_rank_as_lora,
                         config_of=lambda cfg: {"init_lora_weights": True})
    size_knob = "r"
    lrs = (3e-5, 1e-4, 3e-4, 1e-3)  # the factors carry sqrt of W's top singular values (as PiSSA): small steps

    def param_specs(d_in, d_out, cfg):
        if cfg.r > min(d_in, d_out):
            raise ll.ConfigError(
                f"corda r={cfg.r} exceeds min(d_in, d_out)={min(d_in, d_out)} of a target; lower r or narrow the targets."
            )
        return offset_low_rank_specs(d_in, d_out, cfg.r)

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r

    def group_init(model, targets, cfg, calibration_data):
        covs = covariances(model, targets, calibration_data)
        scale, r = cfg.alpha / cfg.r, cfg.r
        with torch.no_grad():
            for t in targets:
                w = ll.dense_weight(t.layer).detach().to(torch.float32)
                u, s, v = _decompose(w, covs[t.name].to(w.device))
                keep = slice(0, r) if cfg.corda_method == "ipm" else slice(-r, None)
                u, s, v = u[:, keep], s[keep] / scale, v[:, keep]
                a, b = v.T.mul(s.sqrt().view(-1, 1)), u.mul(s.sqrt())
                for name, value in (("lora_A", a), ("lora_A0", a), ("lora_B", b), ("lora_B0", b)):
                    getattr(t.layer, name).copy_(value)

    def forward(layer, x, y):
        return offset_low_rank_update(x, layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0,
                                      layer.lora_scaling, y)

    def merge(layer, weight, bias):
        return offset_low_rank_merge(weight, layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0,
                                     layer.lora_scaling), bias

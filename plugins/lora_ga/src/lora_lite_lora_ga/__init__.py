"""LoRA-GA: low-rank adaptation with gradient approximation (Wang et al. 2024,
https://arxiv.org/abs/2407.05000).

LoRA whose factors start on the singular directions of the full fine-tuning gradient, so
that the first LoRA step moves ``W`` as close as rank r allows to a full gradient step.
With ``G = dL/dW`` averaged over the calibration batches and ``G ~ U S V^T`` (randomised
SVD, ``q = min(4r, d_out, d_in)``, ``niter`` iterations, PEFT's choice), the default
``direction="ArB2r"`` takes::

    A0 = V[:, :r]^T,   B0 = U[:, r:2r] diag(S[r:2r]) * d_out^(1/4) / sqrt(stable_gamma)

and the layer computes, with ``s = alpha / r``::

    y' = W x (+ b) + s (B A - B0 A0) x,    A, B trainable from A0, B0; A0, B0 frozen

This is PEFT's ``W_res = W - s B0 A0`` plus ``s B A``, with the subtraction kept next to the
adapter instead of written into ``W``: ``load`` copies saved tensors after the attach-time
hooks have run, so a weight rewritten from calibrated factors could not be rebuilt
bit-exactly at load (no hook runs after the copy; see NOTES-lora_ga.md for the core change
that would allow it). The cost is a second rank-r product per call; the gain is exact
identity, exact reload without data, and quantized layers.

Identity at init: ``A = A0``, ``B = B0``, and the hook computes ``B A x - B0 A0 x`` as two
identical products subtracted, exactly zero, so ``y' = y`` bit for bit.

Directions (``ArBr``, ``A2rBr``, ``ArB2r``, ``random``) and scales (``stable``,
``weight_svd``, ``gd_scale``, ``unit``) are PEFT's ``LoraGAConfig`` options, same
arithmetic. The randomised SVD (and ``random``'s permutation) draw from a generator
seeded with ``seed`` per layer, so results do not depend on the global RNG.

Calibration (``group_init``): every parameter is frozen (core restores flags and grads),
the model runs in train mode (as PEFT's estimate) and each target's weight gradient is
``sum dy^T x`` over its calls, taken from its input and its output's gradient by
temporary hooks, so no weight needs ``requires_grad`` and any layer kind works. The
gradient is averaged over the calls, as PEFT counts backward passes. The loss of a batch:
``out.loss`` when the model returns one; for a dict with ``input_ids`` and logits, the
next-token cross-entropy on ``labels`` (default: ``input_ids``, padding masked by
``attention_mask``); an ``(inputs, targets)`` pair gives cross-entropy (integer targets) or
mean squared error; a bare tensor output gives ``mean(out^2)``, a stand-in objective only
(pass pairs or labels for your task).

Layers: every linear-like kind (``nn.Linear``, transformers ``Conv1D``, bitsandbytes 4/8-bit):
the base weight is read only by ``scale="weight_svd"`` (through ``lora_lite.dense_weight``)
and never written. Not implemented from PEFT: the gradient cache file.

PEFT format: PEFT stores ``W_res`` in the base model, so ``export_peft`` writes the rank-``2r``
LoRA delta against the original base, ``A' = [A; A0]``, ``B' = [B, -B0]``, ``alpha' = 2 alpha``,
``init_lora_weights: true`` (what PEFT's ``path_initial_model_for_weight_conversion`` writes;
exact: the saved factors concatenated). That file, and PEFT's own converted one, import as plain
``lora``. PEFT's unconverted files (``init_lora_weights: "lora_ga"``) are refused on import:
their ``W_res`` depends on a calibration gradient the file does not hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import lora_lite as ll
from lora_lite.functional import (
    offset_low_rank_as_lora,
    offset_low_rank_merge,
    offset_low_rank_specs,
    offset_low_rank_update,
)


@dataclass
class LoRAGAConfig(ll.LoraLiteConfig):
    variant: str = "lora_ga"
    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: float = 16.0
    niter: int = 4
    seed: int = 0

    def validate(self):
        if self.stable_gamma <= 0:
            raise ll.ConfigError(f"lora_ga stable_gamma must be > 0, got {self.stable_gamma}.")
        if self.niter < 0:
            raise ll.ConfigError(f"lora_ga niter must be >= 0, got {self.niter}.")


def _svd_lowrank(m: torch.Tensor, q: int, niter: int, seed: int):
    with torch.random.fork_rng(devices=[m.device] if m.is_cuda else []):
        torch.manual_seed(seed)
        return torch.svd_lowrank(m, q=q, niter=niter)


def _factors(grad: torch.Tensor, layer, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's lora_ga_init: (A0 (r, d_in), B0 (d_out, r)) in float32 from the gradient."""
    r = cfg.r
    with torch.random.fork_rng(devices=[grad.device] if grad.is_cuda else []):
        torch.manual_seed(cfg.seed)
        u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=cfg.niter)
        vh, u, s = v.T[: 2 * r], u[:, : 2 * r], s[: 2 * r]
        if cfg.direction == "ArBr":
            a_idx, b_idx = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
        elif cfg.direction == "A2rBr":
            a_idx, b_idx = slice(r, 2 * r), slice(0, r)
        elif cfg.direction == "ArB2r":
            a_idx, b_idx = slice(0, r), slice(r, 2 * r)
        else:
            a_idx = b_idx = torch.randperm(2 * r)[:r]
    a, s_b = vh[a_idx], s[b_idx]
    b = u[:, b_idx] @ torch.diag(s_b)
    scaling = cfg.alpha / r
    if cfg.scale == "stable":
        b = b * (grad.shape[0] ** 0.25 / cfg.stable_gamma**0.5)
    elif cfg.scale == "weight_svd":
        w = ll.dense_weight(layer).detach().to(torch.float32)
        _, w_s, _ = _svd_lowrank(w, r, cfg.niter, cfg.seed)
        if s_b[0] > 0:
            b = b * (w_s[0] / s_b[0])
    elif cfg.scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a, b


def _batch_loss(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device

    def to(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    target = None
    if isinstance(batch, Mapping):
        inputs = {k: to(v) for k, v in batch.items()}
        out = model(**inputs)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        inputs, target = to(batch[0]), to(batch[1])
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    elif isinstance(batch, torch.Tensor):
        inputs = to(batch)
        out = model(inputs)
    else:
        raise ll.CalibrationError(
            f"lora_ga: a calibration batch is a {type(batch).__name__}; pass dicts of model inputs (with labels, or "
            "input_ids for a causal LM), (inputs, targets) pairs, or tensors."
        )
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ll.CalibrationError(
            f"lora_ga: the model returned a {type(out).__name__} with neither a loss nor logits; pass batches the "
            "model computes a loss for (e.g. with labels)."
        )
    if target is not None:
        if target.is_floating_point():
            return F.mse_loss(logits.float(), target.float())
        return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=-100)
    if isinstance(batch, Mapping) and "input_ids" in inputs and logits.dim() == 3:
        labels = inputs.get("labels", inputs["input_ids"]).clone()
        mask = inputs.get("attention_mask")
        if mask is not None and mask.shape == labels.shape:
            labels = labels.masked_fill(mask == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return logits.float().pow(2).mean()


def _capture(acc, counts, key):
    def hook(module, args, output):
        x = args[0].detach()
        if not output.requires_grad:  # nothing upstream needs grad: start the graph here
            output = output.detach().requires_grad_(True)

        def grad_hook(g):
            gw = g.reshape(-1, g.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()
            acc[key] = gw if acc.get(key) is None else acc[key] + gw
            counts[key] = counts.get(key, 0) + 1

        output.register_hook(grad_hook)
        return output

    return hook


def weight_gradients(model, targets, calibration_data) -> dict[str, torch.Tensor]:
    """``{target name: dL/dW (d_out, d_in) float32}``, averaged over the calls of each target."""
    for p in model.parameters():  # core restores requires_grad and .grad after group_init
        p.requires_grad_(False)
    acc, counts = {}, {}

    def run(m, batch):
        loss = _batch_loss(m, batch)
        if loss.requires_grad:
            loss.backward()

    ll.run_calibration(  # in train mode, as PEFT's estimate
        model, calibration_data, variant="lora_ga", why="initialises A and B from the gradient of a calibration loss",
        run=run, forward_hooks=[(t.host, _capture(acc, counts, t.name)) for t in targets], train=True, grad=True,
    )
    out = {}
    for t in targets:
        if t.name not in acc:
            raise ll.CalibrationError(
                f"lora_ga: the calibration loss does not depend on {t.name} (no gradient reached it); "
                "exclude it from the targets or use data and a loss that use it."
            )
        out[t.name] = acc[t.name] / counts[t.name]
        if not torch.isfinite(out[t.name]).all():
            raise ll.CalibrationError(f"lora_ga: the calibration gradient of {t.name} is not finite.")
    return out


class LoRAGA:
    name = "lora_ga"
    config_class = LoRAGAConfig
    additive = True  # y + delta(x): rows of a batch may use different attachments
    # export: the delta against the original base (a plain LoRA of rank 2r); PEFT's unconverted
    # init_lora_weights="lora_ga" files are refused on import (their W_res depends on calibration data)
    peft = ll.PeftFormat({"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
                         {"use_dora": False, "init_lora_weights": "lora_ga"}, convert=offset_low_rank_as_lora,
                         config_of=lambda cfg: {"init_lora_weights": True})
    size_knob = "r"
    lrs = (3e-5, 1e-4, 3e-4, 1e-3)  # starts on the gradient's directions: LoRA's grid, one step lower

    def param_specs(d_in, d_out, cfg):
        if 2 * cfg.r > min(d_in, d_out):
            raise ll.ConfigError(
                f"lora_ga takes 2r={2 * cfg.r} singular directions of each gradient, more than min(d_in, d_out)="
                f"{min(d_in, d_out)} of a target; lower r or narrow the targets."
            )
        return offset_low_rank_specs(d_in, d_out, cfg.r)

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r

    def group_init(model, targets, cfg, calibration_data):
        grads = weight_gradients(model, targets, calibration_data)
        with torch.no_grad():
            for t in targets:
                a, b = _factors(grads[t.name], t.layer, cfg)
                for name, value in (("lora_A", a), ("lora_A0", a), ("lora_B", b), ("lora_B0", b)):
                    getattr(t.layer, name).copy_(value)

    def forward(layer, x, y):
        return offset_low_rank_update(x, layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0,
                                      layer.lora_scaling, y)

    def merge(layer, weight, bias):
        return offset_low_rank_merge(weight, layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0,
                                     layer.lora_scaling), bias

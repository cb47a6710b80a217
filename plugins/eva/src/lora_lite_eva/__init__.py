"""EVA: explained variance adaptation (Paischer et al. 2024, https://arxiv.org/abs/2410.07170).

LoRA whose ``A`` starts on the directions where the layer's inputs vary most. With the
centred covariance ``C = Cov(x)`` of a target's inputs ``x`` over the calibration tokens
and its top-r eigenvectors ``v_1..v_r`` (the principal components)::

    A = [v_1 ... v_r]^T,   B = 0,   y' = y + (alpha / r) * B A x

Calibration (``group_init``) runs the model once over ``calibration_data`` with temporary
pre-hooks that gather every target's inputs into a mean and centred scatter matrix
(float64, merged batch by batch with Chan's update: exact whatever the batching).
Padding tokens (``attention_mask == 0``) and ignored tokens (``labels == label_mask_value``,
-100 by default) are left out. The sign of each component is fixed as PEFT's incremental
PCA does it (largest-magnitude entry positive), so the result is deterministic. The
rank is the same ``r`` for every target: PEFT's rank redistribution (``rho > 1``) and
whitening are not implemented. Memory: one ``d_in x d_in`` float64 matrix per target.

Calibration only reads activations and never changes a weight; ``A`` is a persistent
adapter tensor, so ``load`` needs no data.

Identity at init: ``B = 0``, so ``B A x = 0`` and ``y' = y`` exactly.

Layers: any linear-like layer (EVA never reads the base weight, so quantized layers
work); the targets' inputs must be ``(batch, seq, d_in)`` when padding is masked.

PEFT format: EVA never rewrites the base weight, so an initialised EVA adapter is a plain
LoRA (``s B A x``, ``s = alpha / r``) and both directions copy ``lora_A``, ``lora_B`` as
they are. ``export_peft`` writes what PEFT saves after ``initialize_lora_eva_weights``:
``init_lora_weights: "eva"`` and ``eva_config`` with ``rho: 1.0`` (lora-lite's EVA keeps
the same ``r`` on every target, so ``rank_pattern`` and ``alpha_pattern`` stay empty),
``label_mask_value`` from the knob, PEFT's defaults otherwise (``use_label_mask: true``,
``whiten: false``; ``tau`` and ``adjust_scaling_factors`` do not apply to an exact
eigendecomposition without redistribution). ``PeftModel.from_pretrained`` zeroes ``B``
and loads the file. ``import_peft`` reads a PEFT LoRA file with ``init_lora_weights:
"eva"`` (saved after ``initialize_lora_eva_weights``, trained or not) without calibration
data: the file holds the components. ``eva_config`` only parametrises the calibration
(``label_mask_value`` is read into the knob; ``use_label_mask``, ``whiten``, ``tau`` are
not modelled and would matter only to a new calibration). PEFT's rank redistribution
(``rho > 1``) writes per-module ranks ``k`` in ``rank_pattern`` and, with
``adjust_scaling_factors`` (PEFT's default), ``alpha_k = alpha k / r`` in ``alpha_pattern``:
the scale ``alpha_k / k`` is then one number, and each module is imported zero-padded to
the largest rank ``R`` (``A`` gets zero rows, ``B`` zero columns; ``B A`` is unchanged and
the padding gets zero gradients, so it stays zero in training), with ``r = R`` and
``alpha = s R``. Refused: an ``alpha_pattern`` that gives modules different scales
(``adjust_scaling_factors: false`` with redistributed ranks) and any other option plain
LoRA import refuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

import lora_lite as ll


@dataclass
class EVAConfig(ll.LoraLiteConfig):
    variant: str = "eva"
    label_mask_value: int = -100


class _Moments:
    """Token count, mean and centred scatter of one target's inputs (Chan et al.'s merge)."""

    def __init__(self):
        self.n, self.mean, self.scatter = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        n_b, mean_b = x.shape[0], x.mean(0)
        xc = x - mean_b
        delta, n = mean_b - self.mean, self.n + n_b
        self.scatter = self.scatter + xc.T @ xc + torch.outer(delta, delta) * (self.n * n_b / n)
        self.mean, self.n = self.mean + delta * (n_b / n), n


def _capture(name, moments, batch_mask):
    def hook(module, args):
        x = args[0].detach()
        if not torch.isfinite(x).all():
            raise ll.CalibrationError(f"eva: the inputs of {name} contain NaN or inf; check the calibration data.")
        masks = batch_mask[0]
        if masks:
            # the first mask shaped like this layer's tokens: encoder layers of an
            # encoder-decoder model match attention_mask, decoder layers the labels
            fitting = [m for m in masks if m.shape == x.shape[:-1]]
            if fitting:
                x = x[fitting[0]]
            elif not all(bool(m.all()) for m in masks):
                raise ll.CalibrationError(
                    f"eva: {name} sees inputs of shape {tuple(x.shape)} that align with no mask "
                    f"{[tuple(m.shape) for m in masks]}, so padding cannot be masked; pass unpadded calibration batches."
                )
        if x.shape[0]:
            moments.add(x.reshape(-1, x.shape[-1]))

    return hook


def _run_batch(model, batch, cfg, batch_mask):
    device = next(model.parameters()).device
    if isinstance(batch, torch.Tensor):
        batch_mask[0] = None
        return model(batch.to(device))
    if not isinstance(batch, Mapping):
        raise ll.CalibrationError(
            f"eva: a calibration batch is a {type(batch).__name__}; pass dicts of model inputs "
            "(e.g. a tokenizer's output, with attention_mask and optionally labels) or tensors."
        )
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels = inputs.pop("labels", None)
    masks = [inputs[k].bool() for k in ("attention_mask", "decoder_attention_mask") if inputs.get(k) is not None]
    if labels is not None:
        keep = labels != cfg.label_mask_value
        # decoder-only: padding and ignored labels share positions, so combine them
        masks = [m & keep for m in masks if m.shape == keep.shape] + masks + [keep]
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            inputs["labels"] = labels  # the decoder's inputs are built from the labels
    batch_mask[0] = masks
    return model(**inputs)


def principal_components(model, targets, cfg, calibration_data) -> dict[str, torch.Tensor]:
    """``{target name: (r, d_in) top-r principal components of its inputs}`` over the data."""
    moments = {t.name: _Moments() for t in targets}
    batch_mask = [None]
    ll.run_calibration(
        model, calibration_data, variant="eva", why="initialises lora_A from the principal components of each "
        "target's inputs", run=lambda m, batch: _run_batch(m, batch, cfg, batch_mask),
        pre_hooks=[(t.host, _capture(t.name, moments[t.name], batch_mask)) for t in targets],
    )
    out = {}
    for t in targets:
        m = moments[t.name]
        if m.n <= cfg.r:
            raise ll.CalibrationError(
                f"eva: {t.name} saw {m.n} unmasked calibration tokens; r={cfg.r} components need more than r. "
                "Pass more (or less padded) calibration data."
            )
        _, vecs = torch.linalg.eigh(m.scatter / (m.n - 1))
        comps = vecs[:, -cfg.r:].flip(-1).T
        peak = comps.abs().argmax(dim=1, keepdim=True)
        out[t.name] = comps * torch.sign(comps.gather(1, peak))
    return out


def _peft_entries(cfg) -> dict:
    # what PEFT writes after initialize_lora_eva_weights with rho=1 (no redistribution)
    return {"init_lora_weights": "eva", "rank_pattern": {}, "alpha_pattern": {},
            "eva_config": {"rho": 1.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": cfg.label_mask_value,
                           "whiten": False, "adjust_scaling_factors": True}}


def _pattern(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first key that is a dotted suffix (regex) of the module path."""
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
    return default if key is None else patterns[key]


def _scale(peft_cfg: dict, r, alpha) -> float:
    return alpha / (math.sqrt(r) if peft_cfg.get("use_rslora") else r)


def _padded_rank(peft_cfg: dict) -> int:
    """One rank for every module: the largest of r and rank_pattern's (EVA's redistribution)."""
    ranks = [int(peft_cfg["r"]), *(int(v) for v in (peft_cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def _knobs(peft_cfg: dict) -> dict:
    knobs = {"label_mask_value": int((peft_cfg.get("eva_config") or {}).get("label_mask_value", -100))}
    if peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"):  # one scale (checked per module in _read)
        big = _padded_rank(peft_cfg)
        knobs.update(r=big, alpha=_scale(peft_cfg, peft_cfg["r"], peft_cfg["lora_alpha"]) * big)
    return knobs


def _read(peft_cfg: dict, module: str, t: dict) -> dict:
    """A module of rank k <= R, its scale checked equal to the adapter's, zero-padded to rank R."""
    k, big = t["lora_A"].shape[0], _padded_rank(peft_cfg)
    want = int(_pattern(peft_cfg.get("rank_pattern") or {}, module, peft_cfg["r"]))
    if k != want or t["lora_B"].shape[1] != k:
        raise ll.PeftInteropError(f"{module}: lora_A has rank {k} and lora_B {t['lora_B'].shape[1]} in the file, "
                                  f"but r / rank_pattern give {want} (PEFT would not load it either).")
    alpha = _pattern(peft_cfg.get("alpha_pattern") or {}, module, peft_cfg["lora_alpha"])
    s, s_k = _scale(peft_cfg, peft_cfg["r"], peft_cfg["lora_alpha"]), _scale(peft_cfg, k, alpha)
    if not math.isclose(s_k, s, rel_tol=1e-12):
        raise ll.PeftInteropError(
            f"{module}: rank {k} with lora_alpha {alpha} scales by {s_k:g}, the adapter's r / lora_alpha by {s:g}; "
            "lora-lite's eva has one scale (PEFT's EVA keeps it with adjust_scaling_factors=True, its default)."
        )
    if k == big:
        return t
    a, b = t["lora_A"], t["lora_B"]
    return {"lora_A": torch.cat([a, a.new_zeros(big - k, a.shape[1])]),
            "lora_B": torch.cat([b, b.new_zeros(b.shape[0], big - k)], dim=1)}


class EVA:
    name = "eva"
    config_class = EVAConfig
    additive = True  # y + delta(x): rows of a batch may use different attachments
    # a plain LoRA once initialised: the tensors as they are, with PEFT's EVA config entries
    peft = ll.PeftFormat({"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
                         {"use_dora": False, "init_lora_weights": "eva"}, config_of=_peft_entries, knobs_of=_knobs,
                         read=_read, neutral=("rank_pattern", "alpha_pattern"))

    def param_specs(d_in, d_out, cfg):
        if cfg.r > d_in:
            raise ll.ConfigError(f"eva r={cfg.r} exceeds a target's d_in={d_in}; lower r or narrow the targets.")
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="zeros"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r

    def group_init(model, targets, cfg, calibration_data):
        comps = principal_components(model, targets, cfg, calibration_data)
        with torch.no_grad():
            for t in targets:
                t.layer.lora_A.copy_(comps[t.name])

    def forward(layer, x, y):
        return ll.low_rank_update(x, layer.lora_A, layer.lora_B, layer.lora_scaling, y)

    def merge(layer, weight, bias):
        # W' = W + s B A, onto the current weight (PiSSA's W_res): exactly what forward adds
        return torch.addmm(weight, layer.lora_B.float(), layer.lora_A.float(), alpha=layer.lora_scaling), bias

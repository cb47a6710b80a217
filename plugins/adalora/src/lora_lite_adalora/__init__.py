"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang et al. 2023,
https://arxiv.org/abs/2303.10512).

The update is written in SVD form, with ``r`` (PEFT's ``init_r``) triplets per layer::

    y' = y + s * P diag(E) Q x,    Q = lora_A: (r, d_in), E = lora_E: (r, 1), P = lora_B: (d_out, r)
    s = alpha / (r + 1e-5)          (PEFT's ``scaling / (ranknum + 1e-5)``)

During training a budget schedule removes the least important triplets across all layers:
importance of a triplet i of a layer is ``S(E_i) + mean_j S(Q_ij) + mean_k S(P_ki)`` with
``S = Ibar * Ubar``, the exponential moving averages (``beta1``, ``beta2``) of the
sensitivity ``I = |p * grad p|`` and of its uncertainty ``|I - Ibar|``. The total budget
(sum of live triplets) falls from ``r * n_layers`` to ``target_r * n_layers`` by a cubic
schedule between step ``tinit`` and ``total_step - tfinal``; every ``deltaT`` steps the
triplets whose importance is at or below the k-th smallest (``k = initial budget -
budget``) get ``E_i = 0``; at ``total_step - tfinal`` the final mask is fixed and reapplied
after every later step. As PEFT does, ranks change by zeroing ``E`` entries, never by
resizing, so every tensor keeps its shape and ``save``/``load`` stay exact. The paper's
orthogonality penalty ``orth_reg_weight * mean over P, Q of ||Q Q^T - I||_F, ||P^T P - I||_F``
is the ``regularization_loss`` hook.

Training loop (``lora_lite.step`` is PEFT's ``update_and_allocate``; its i-th call, counting
from 0, is ``update_and_allocate(i)``, the step counter lives in ``lora_step``)::

    loss = loss_fn(model(batch)) + lora_lite.regularization_loss(model)
    loss.backward(); opt.step(); lora_lite.step(model); opt.zero_grad()

Identity at init: ``E = 0`` (``Q``, ``P`` are N(0, 0.02^2), as in PEFT), so the delta is
exactly zero; the first step moves ``E`` and then ``Q``, ``P`` get gradients.

State: the EMAs (``lora_ipt_*``, ``lora_unc_*``, fp32), the last mask (``lora_mask``) and
the step counter (``lora_step``) are persistent, non-trainable tensors on each layer, so a
checkpoint resumes the schedule exactly (PEFT keeps the EMAs in memory only).

Layers: any linear-like layer, bitsandbytes 4/8-bit included: AdaLoRA never reads the base
weight. Not implemented from PEFT: physically resizing the layers to the final rank pattern
(PEFT does so only when loading a checkpoint; here the masked triplets stay as zeros), conv
layers, DeepSpeed gradient gathering.

PEFT format (``lora_lite.export_peft`` / ``import_peft``), both ways and exact: PEFT's
``ADALORA``, ``lora_A`` / ``lora_E`` / ``lora_B`` per target; ``r`` is ``init_r``, ``alpha``
``lora_alpha`` (PEFT's scale ``lora_alpha / (ranknum + 1e-5)``, ``ranknum = init_r`` even after
a resize), and ``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``orth_reg_weight``, ``total_step`` keep their names. After a budget allocation PEFT's file
holds only the live triplets and the config's ``rank_pattern`` (``{"<module>.lora_E": [bool] *
init_r}``) says which: export writes a layer that way when its mask drops triplets whose ``E``
is zero (always so right after ``lora_lite.step``), which is the same function; a layer whose
masked ``E`` has moved since (a ``deltaT > 1`` step between allocations) is written with all
its triplets and no pattern, exactly what it computes. Import puts the kept triplets back in
their rows, zeros in the dropped ones, and the pattern into ``lora_mask``. PEFT saves no
schedule state: the EMAs and ``lora_step`` are not written and import starts them at zero.
Export refuses ``total_step=None`` (PEFT's config requires it) and ``alpha <= 0`` (PEFT then
uses ``init_r``); import reads ``lora_alpha <= 0`` as ``init_r``, caps ``target_r`` at
``init_r`` (a larger one never masks, in either library), and refuses ``bias`` other than
``"none"``, ``fan_in_fan_out``, ``lora_bias``, ``alpha_pattern``, ``modules_to_save`` and a
``rank_pattern`` entry that does not fit the tensors. ``lora_dropout``, ``init_lora_weights``,
``use_rslora`` (AdaLoRA ignores it) and LoRA's unused ``r`` are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_lite as ll

_STATE = ("A", "E", "B")


@dataclass
class AdaLoRAConfig(ll.LoraLiteConfig):
    """``r`` is the initial rank of every layer (PEFT's ``init_r``)."""

    variant: str = "adalora"
    target_r: int | None = None  # average final rank; None: 2/3 of r (PEFT's defaults 12 -> 8)
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    @property
    def final_r(self) -> int:
        return self.target_r if self.target_r is not None else max(1, 2 * self.r // 3)

    def validate(self):
        if self.target_r is not None and not 0 <= self.target_r <= self.r:
            raise ll.ConfigError(f"adalora target_r must be in [0, r={self.r}], got {self.target_r}.")
        if self.tinit < 0 or self.tfinal < 0:
            raise ll.ConfigError(f"adalora tinit and tfinal must be >= 0, got {self.tinit}, {self.tfinal}.")
        if self.deltaT < 1:
            raise ll.ConfigError(f"adalora deltaT must be >= 1, got {self.deltaT}.")
        for knob in ("beta1", "beta2"):
            if not 0 < getattr(self, knob) < 1:
                raise ll.ConfigError(f"adalora {knob} must be in (0, 1), got {getattr(self, knob)}.")
        if self.orth_reg_weight < 0:
            raise ll.ConfigError(f"adalora orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        if self.total_step is not None:
            if self.total_step <= 0:
                raise ll.ConfigError(f"adalora total_step must be > 0, got {self.total_step}.")
            if self.tinit >= self.total_step - self.tfinal:
                raise ll.ConfigError(
                    f"adalora tinit={self.tinit} >= total_step - tfinal = {self.total_step - self.tfinal}: "
                    "no step is left to reduce the budget. Lower tinit/tfinal or raise total_step."
                )


def _small_normal(t: torch.Tensor) -> None:
    t.normal_(0.0, 0.02)


def _budget(cfg, step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """PEFT's RankAllocator.budget_schedule, same arithmetic."""
    tinit, tfinal, total = cfg.tinit, cfg.tfinal, cfg.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % cfg.deltaT == 0


def _update_ipt(layers, cfg) -> None:
    b1, b2 = cfg.beta1, cfg.beta2
    for layer in layers:
        for x in _STATE:
            p = getattr(layer, f"lora_{x}")
            if p.grad is None:
                raise ll.LoraLiteError(
                    "adalora: lora_lite.step(model) scores triplets by |p * grad|, and lora_" + x + " has no "
                    "gradient. Call it after loss.backward() and optimizer.step(), before optimizer.zero_grad()."
                )
            ema, unc = getattr(layer, f"lora_ipt_{x}"), getattr(layer, f"lora_unc_{x}")
            ipt = (p.detach().float() * p.grad.float()).abs()
            ema.copy_(b1 * ema + (1 - b1) * ipt)
            unc.copy_(b2 * unc + (1 - b2) * (ipt - ema).abs())


def _scores(layer) -> torch.Tensor:
    """Importance of each triplet (r,), as PEFT's mask_to_budget combines it."""
    s = {x: getattr(layer, f"lora_ipt_{x}") * getattr(layer, f"lora_unc_{x}") for x in _STATE}
    ipt_ab = torch.cat([s["A"].mean(dim=1, keepdim=True), s["B"].mean(dim=0).view(-1, 1)], dim=1).sum(dim=1)
    return s["E"].view(-1) + ipt_ab.view(-1)


def _mask_to_budget(layers, budget: int, init_bgt: int) -> None:
    k = init_bgt - budget
    scores = [_scores(layer) for layer in layers]
    if k <= 0:  # nothing to drop (PEFT's kthvalue would fail on k = 0)
        keep = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    else:
        threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item()
        keep = [s > threshold for s in scores]
    for layer, m in zip(layers, keep):
        layer.lora_E.masked_fill_(~m.view(-1, 1), 0.0)
        layer.lora_mask.copy_(m)


def _kept(layer) -> torch.Tensor | None:
    """The triplets PEFT's file keeps for this layer, or None to write them all (nothing
    masked, or a masked E no longer zero: dropping it would change the function)."""
    mask = layer.lora_mask.detach().cpu().bool()
    if bool(mask.all()) or bool((layer.lora_E.detach().cpu().view(-1)[~mask] != 0).any()):
        return None
    return mask


def _to_peft(layer, cfg, t):
    if cfg.total_step is None:
        raise ll.PeftInteropError(
            "adalora: PEFT's AdaLoraConfig requires total_step; attach (or load) with total_step=... to export."
        )
    if cfg.alpha <= 0:
        raise ll.PeftInteropError(f"adalora alpha={cfg.alpha}: PEFT's AdaLoRA scales by init_r when lora_alpha <= 0.")
    keep = _kept(layer)
    if keep is not None:
        t = {"lora_A": t["lora_A"][keep], "lora_E": t["lora_E"][keep], "lora_B": t["lora_B"][:, keep]}
    return t, cfg.r, cfg.alpha


def _peft_entries(att) -> dict:
    pattern = {}
    for target in att.targets:
        keep = _kept(target.layer)
        if keep is not None:
            pattern[f"{target.name}.lora_E"] = keep.tolist()
    return {"rank_pattern": pattern or None, "target_r": att.cfg.final_r}


def _knobs(config) -> dict:
    r = int(config["init_r"])
    knobs = {"target_r": min(int(config["target_r"]), r)} if config.get("target_r") is not None else {}
    if config.get("lora_alpha", 1) <= 0:
        knobs["alpha"] = float(r)  # PEFT's scaling when lora_alpha <= 0
    return knobs


def _from_peft(config, module, t):
    """The file's triplets back in their rows of ``init_r``, per ``rank_pattern``."""
    pattern = {k.rsplit(".", 1)[0]: v for k, v in (config.get("rank_pattern") or {}).items()}
    keep = pattern.get(module)
    if keep is None:
        return t
    r = int(config["init_r"])
    kept = int(t["lora_A"].shape[0])
    if (not isinstance(keep, list) or len(keep) != r or not all(isinstance(k, bool) for k in keep)
            or sum(keep) != kept or t["lora_E"].shape[0] != kept or t["lora_B"].shape[-1] != kept):
        raise ll.PeftInteropError(
            f"adalora: rank_pattern of {module} is not init_r={r} booleans keeping the {kept} triplets the file holds."
        )
    mask = torch.tensor(keep)
    a = t["lora_A"].new_zeros(r, t["lora_A"].shape[1])
    e = t["lora_E"].new_zeros(r, t["lora_E"].shape[1])
    b = t["lora_B"].new_zeros(t["lora_B"].shape[0], r)
    a[mask], e[mask], b[:, mask] = t["lora_A"], t["lora_E"], t["lora_B"]
    return {"lora_A": a, "lora_E": e, "lora_B": b, "lora_mask": mask.float()}


class AdaLoRA:
    name = "adalora"
    config_class = AdaLoRAConfig
    additive = True
    size_knob = "r"
    lrs = (3e-4, 1e-3, 3e-3, 1e-2)
    # PEFT's ADALORA; rank_pattern (written by _peft_entries, read by _from_peft) drops masked triplets
    peft = ll.PeftFormat(
        {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"},
        {"fan_in_fan_out": False, "bias": "none"},
        convert=_to_peft,
        peft_type="ADALORA",
        config_fields={"r": "init_r", "alpha": "lora_alpha", **{k: k for k in (
            "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")}},
        # rank_pattern is read by `read`; LoRA's r is unused by AdaLoRA, as are use_rslora and the
        # megatron/qalora knobs (off without their switches); dropout and init do not change the function
        neutral=("rank_pattern", "r", "lora_dropout", "init_lora_weights", "use_rslora", "megatron_core",
                 "qalora_group_size"),
        knobs_of=_knobs,
        importable=True,
        config_from=_peft_entries,
        read=_from_peft,
    )

    def param_specs(d_in, d_out, cfg):
        r = cfg.r
        specs = {
            "lora_A": ll.ParamSpec((r, d_in), init=_small_normal),
            "lora_E": ll.ParamSpec((r, 1), init="zeros"),
            "lora_B": ll.ParamSpec((d_out, r), init=_small_normal),
        }
        for x, shape in (("A", (r, d_in)), ("E", (r, 1)), ("B", (d_out, r))):
            specs[f"lora_ipt_{x}"] = ll.ParamSpec(shape, trainable=False, keep_fp32=True)
            specs[f"lora_unc_{x}"] = ll.ParamSpec(shape, trainable=False, keep_fp32=True)
        specs["lora_mask"] = ll.ParamSpec((r,), init="ones", trainable=False, keep_fp32=True)
        specs["lora_step"] = ll.ParamSpec((1,), trainable=False, keep_fp32=True)
        return specs

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / (cfg.r + 1e-5)

    def forward(layer, x, y):
        dt = x.dtype
        a, e, b = layer.lora_A, layer.lora_E, layer.lora_B
        if a.dtype != dt:
            a, e, b = a.to(dt), e.to(dt), b.to(dt)
        h = F.linear(x, a) * e.view(-1)  # the r-wide intermediate, scaled by the singular values
        return torch.add(y, F.linear(h, b), alpha=layer.lora_scaling)

    def merge(layer, weight, bias):
        a = layer.lora_A.float() * layer.lora_E.float()
        return torch.addmm(weight, layer.lora_B.float(), a, alpha=layer.lora_scaling), bias

    def regularization_loss(targets, cfg):
        if cfg.orth_reg_weight == 0:
            return None
        total, n = 0, 0
        for t in targets:
            for cov in (t.layer.lora_A @ t.layer.lora_A.T, t.layer.lora_B.T @ t.layer.lora_B):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                total = total + torch.linalg.matrix_norm(cov - eye)
                n += 1
        return cfg.orth_reg_weight * (total / n)

    def step(targets, cfg):
        if cfg.total_step is None:
            raise ll.ConfigError(
                "adalora needs total_step (the number of optimizer steps of the run) to schedule the rank budget; "
                "attach with LoraLiteConfig(variant='adalora', total_step=...)."
            )
        layers = [t.layer for t in targets]
        g = int(layers[0].lora_step.item())
        init_bgt = sum(layer.lora_E.shape[0] for layer in layers)
        target_bgt = cfg.final_r * len(layers)
        end = cfg.total_step - cfg.tfinal
        with torch.no_grad():
            if g < end:  # scoring phase: update the EMAs, mask every deltaT steps after tinit
                _update_ipt(layers, cfg)
                budget, mask_now = _budget(cfg, g, init_bgt, target_bgt)
                if mask_now:
                    _mask_to_budget(layers, budget, init_bgt)
            elif g == end:  # the final allocation; the scores are dropped (PEFT's reset_ipt)
                _mask_to_budget(layers, _budget(cfg, g, init_bgt, target_bgt)[0], init_bgt)
                for layer in layers:
                    for x in _STATE:
                        getattr(layer, f"lora_ipt_{x}").zero_()
                        getattr(layer, f"lora_unc_{x}").zero_()
            else:  # final fine-tuning: keep the masked triplets at zero
                for layer in layers:
                    layer.lora_E.masked_fill_(layer.lora_mask.view(-1, 1) == 0, 0.0)
            for layer in layers:
                layer.lora_step.add_(1)

"""PSOFT: efficient orthogonal fine-tuning with principal subspace adaptation (ICLR 2026,
https://openreview.net/forum?id=FSHrinMArK; official code github.com/fei407/PSOFT, merged into
PEFT as ``peft.tuners.psoft``, whose math and knob names this follows).

With the top-r SVD of the frozen weight ``W = U S V^T`` (``(d_out, d_in)``) and the scale
``s = alpha / r``, two frozen factors span the principal subspace (``ab_svd_init``)::

    psoft_init (default):  A = V_r^T            B = U_r diag(S_r / s)       (A row-orthonormal)
    pissa_init:            A = sqrt(S_r/s) V_r^T   B = U_r sqrt(S_r/s)

and an ``r x r`` matrix ``R`` trains between them::

    y' = y + s B (R - I) A x,      R = diag(b) C(Q) diag(a)

``C(Q)`` is the Cayley transform ``(I + Q)(I - Q)^-1`` of the skew-symmetric ``Q`` whose upper
triangle holds the ``r (r - 1) / 2`` trainable numbers (``orth=True``; with
``use_cayley_neumann`` its truncated series ``I + 2Q + 2Q^2 + ... + Q^(m-1)``, optionally after
scaling ``Q`` to Frobenius norm ``cayley_neumann_eps``), or a free ``r x r`` matrix (``orth=False``).
``b`` and ``a`` are trainable output/input scaling vectors (``mag_b``, ``mag_a``). With psoft_init
``s B A = U_r S_r V_r^T`` is the rank-r part of ``W``, so ``W + s B (R - I) A`` replaces it by
``U_r S_r diag(b) C(Q) diag(a) V_r^T``: an orthogonal transform of the principal subspace when
``a = b = 1``. ``W`` itself is never written (unlike PiSSA).

Identity at init: ``Q = 0`` (or ``R = I`` when ``orth=False``) and ``a = b = 1`` give
``R = I`` exactly, so the update is exactly zero. The gradients of ``Q``, ``a`` and ``b`` at
that point are ``s B^T g (A x)^T`` projected on each, non-zero. The trainable tensors are kept
in fp32 whatever ``cfg.dtype`` (``r^2 / 2 + 2 r`` numbers; ``a``, ``b`` sit at 1.0 where bf16
would swallow small updates).

Factors and reload: ``A`` and ``B`` are frozen. ``save_factors=True`` (default) saves them
(``r (d_in + d_out)`` numbers) and a reload copies them in: exact on any machine.
``save_factors=False`` recomputes them at load: ``torch.linalg.svd`` (``svd="full"``) or
``torch.svd_lowrank`` seeded from ``seed`` in a forked RNG (``svd="lowrank"``), so exact on the
same software and hardware. No sign rule is applied: the factors are PEFT's, bit for bit, so a
PEFT-trained ``R`` copied in gives PEFT's outputs.

Layers: every kind ``lora_lite.dense_weight`` reads: ``nn.Linear``, transformers ``Conv1D``,
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (SVD of the dequantized weight, which is what the
frozen layer computes with; the weight is only read, so identity is exact there too). PEFT
accepts only ``nn.Linear``.

Not implemented from PEFT: ``psoft_dropout`` (lora-lite has no adapter dropout),
``init_weights=False`` (a random non-identity start: perturb the tensors after attach instead),
``fan_in_fan_out`` (``dense_weight`` handles the layout) and PEFT's non-persistent A/B cache
(here a persistent or recomputed tensor).

PEFT format (``ll.export_peft`` / ``ll.import_peft``): PEFT's ``PSOFT`` adapter, ``lora_Q`` /
``lora_mag_b`` / ``lora_mag_a`` as ``psoft_R.weight`` / ``psoft_R.vector_b`` /
``psoft_R.vector_a`` (bit for bit); ``r``, ``alpha`` (``psoft_alpha``), ``ab_svd_init``, ``svd``
(``psoft_svd``), ``niter`` (``psoft_svd_lowrank_niter``), ``seed`` (``random_seed``) and the
Cayley-Neumann knobs under PEFT's names. PEFT never saves ``A`` / ``B``: it recomputes them
from the base weight at load, as ``save_factors=False`` does here, so export leaves them out
(whatever ``save_factors``: factors saved on other hardware can differ from PEFT's recomputed
ones in the last bits) and import computes them in ``init``. Only ``orth=True``,
``mag_a=True``, ``mag_b=True`` (PEFT's defaults): the other settings hold other tensors
(``lora_R`` for ``psoft_R.weight``, no vector), and lora-lite's ``PeftFormat`` maps one fixed
set per variant, so export refuses them and import refuses ``psoft_orth`` / ``psoft_mag_a`` /
``psoft_mag_b`` false (a core extension, tensors that depend on the config, would lift this).
Import also refuses ``fan_in_fan_out`` and anything else it does not model; ``psoft_dropout``
and ``init_weights`` are accepted whatever their value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class PSOFTConfig(ll.LoraLiteConfig):
    variant: str = "psoft"
    ab_svd_init: Literal["psoft_init", "pissa_init"] = "psoft_init"
    svd: Literal["full", "lowrank"] = "full"
    niter: int = 10
    seed: int = 0
    orth: bool = True
    mag_a: bool = True
    mag_b: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None
    save_factors: bool = True

    def validate(self):
        if self.niter < 0:
            raise ll.ConfigError(f"psoft niter must be >= 0, got {self.niter}.")
        if self.num_cayley_neumann_terms < 1:
            raise ll.ConfigError(f"psoft num_cayley_neumann_terms must be >= 1, got {self.num_cayley_neumann_terms}.")
        if self.cayley_neumann_eps is not None and not 0.0 < self.cayley_neumann_eps < 1.0:
            raise ll.ConfigError(f"psoft cayley_neumann_eps must be in (0, 1) or None, got {self.cayley_neumann_eps}.")
        if not self.orth and self.use_cayley_neumann:
            raise ll.ConfigError("psoft use_cayley_neumann=True needs orth=True: a free R (orth=False) has no Cayley map.")


def svd_factors(w: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the top-r SVD of ``w`` as PEFT's ``_build_psoft_ab_cache_buffers`` builds them (fp32)."""
    w32 = w.detach().to(torch.float32)
    r = cfg.r
    if cfg.svd == "full":
        u, sv, vh = torch.linalg.svd(w32, full_matrices=False)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:
        on_cpu = w32.device.type == "cpu"
        fork = {"devices": []} if on_cpu else {"devices": [w32.device], "device_type": w32.device.type}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(cfg.seed)
            u, sv, v = torch.svd_lowrank(w32, q=r, niter=cfg.niter)
        u, sv, vh = u[:, :r], sv[:r], v[:, :r].T
    sv = sv / (cfg.alpha / r)
    if cfg.ab_svd_init == "psoft_init":
        return vh, u * sv
    root = sv.sqrt()
    return root[:, None] * vh, u * root


def rotation(layer, dtype: torch.dtype) -> torch.Tensor:
    """``R = diag(b) C(Q) diag(a)`` (``r x r``) in ``dtype`` (at least fp32 for the solve)."""
    cfg = layer.lora_cfg
    if cfg.orth:
        r = cfg.r
        triu = layer.lora_Q.to(dtype)
        q = triu.new_zeros(r, r)
        rows, cols = torch.triu_indices(r, r, 1, device=triu.device)
        q = q.index_put((rows, cols), triu)
        q = q - q.T
        eye = torch.eye(r, dtype=dtype, device=q.device)
        if cfg.use_cayley_neumann:
            if cfg.cayley_neumann_eps is not None:
                norm = torch.linalg.matrix_norm(q)
                if torch.isfinite(norm) and norm > cfg.cayley_neumann_eps:
                    q = q * (cfg.cayley_neumann_eps / (norm + 1e-12))
            t = cfg.num_cayley_neumann_terms
            rot, power = eye, eye
            for i in range(1, t):  # I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1)
                power = q if i == 1 else power @ q
                rot = rot + (power if i == t - 1 else 2 * power)
        else:
            rot = torch.linalg.solve(eye - q, eye + q, left=False)  # (I + Q)(I - Q)^-1
    else:
        rot = layer.lora_R.to(dtype)
    if cfg.mag_b:
        rot = layer.lora_mag_b.to(dtype)[:, None] * rot
    if cfg.mag_a:
        rot = rot * layer.lora_mag_a.to(dtype)[None, :]
    return rot


def _core(layer, dtype: torch.dtype) -> torch.Tensor:
    """``R - I``: what sits between ``A`` and ``B`` (exactly zero at init)."""
    work = torch.promote_types(dtype, torch.float32)
    rot = rotation(layer, work)
    return (rot - torch.eye(rot.shape[0], dtype=work, device=rot.device)).to(dtype)


def _eye(t: torch.Tensor) -> None:
    t.copy_(torch.eye(t.shape[0]))


def _to_peft(layer, cfg, t):
    """Export: R's tensors only (PEFT recomputes A and B from the base weight); PEFT's default
    tensor set only."""
    if not (cfg.orth and cfg.mag_a and cfg.mag_b):
        raise ll.PeftInteropError(
            f"psoft orth={cfg.orth}, mag_a={cfg.mag_a}, mag_b={cfg.mag_b}: lora-lite's PEFT format maps "
            "psoft_R.weight / vector_b / vector_a of orth=mag_a=mag_b=True only (the other settings hold other "
            "tensors, which the format cannot declare)."
        )
    return t, cfg.r, cfg.alpha


class PSOFT:
    name = "psoft"
    config_class = PSOFTConfig
    additive = True  # y + delta(x): rows of a batch may use different attachments
    lrs = (3e-4, 1e-3, 3e-3, 1e-2)  # r^2/2 + 2r numbers per layer, rotations: like OFT/HRA
    # PEFT's PSOFT: R's triangle and both vectors; A and B are recomputed from the base weight
    peft = ll.PeftFormat(
        {"lora_Q": "psoft_R.weight", "lora_mag_b": "psoft_R.vector_b", "lora_mag_a": "psoft_R.vector_a"},
        {"psoft_orth": True, "psoft_mag_a": True, "psoft_mag_b": True, "fan_in_fan_out": False},
        convert=_to_peft, importable=True, peft_type="PSOFT",
        config_fields={"r": "r", "alpha": "psoft_alpha", "ab_svd_init": "ab_svd_init", "svd": "psoft_svd",
                       "niter": "psoft_svd_lowrank_niter", "seed": "random_seed",
                       "use_cayley_neumann": "use_cayley_neumann",
                       "num_cayley_neumann_terms": "num_cayley_neumann_terms",
                       "cayley_neumann_eps": "cayley_neumann_eps"},
        neutral=("psoft_dropout", "init_weights"),
    )

    def param_specs(d_in, d_out, cfg):
        if cfg.r > min(d_in, d_out):
            raise ll.ConfigError(
                f"psoft r={cfg.r} exceeds min(d_in, d_out)={min(d_in, d_out)} of a target (the SVD has no "
                "more triplets); lower r or narrow the targets."
            )
        r = cfg.r
        frozen = {"init": "empty", "trainable": False, "persistent": cfg.save_factors}
        specs = {
            "lora_A": ll.ParamSpec((r, d_in), **frozen),
            "lora_B": ll.ParamSpec((d_out, r), **frozen),
        }
        if cfg.orth:
            specs["lora_Q"] = ll.ParamSpec((r * (r - 1) // 2,), init="zeros", keep_fp32=True)
        else:
            specs["lora_R"] = ll.ParamSpec((r, r), init=_eye, keep_fp32=True)
        if cfg.mag_b:
            specs["lora_mag_b"] = ll.ParamSpec((r,), init="ones", keep_fp32=True)
        if cfg.mag_a:
            specs["lora_mag_a"] = ll.ParamSpec((r,), init="ones", keep_fp32=True)
        return specs

    def init(layer, cfg):
        a, b = svd_factors(ll.dense_weight(layer), cfg)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        layer.lora_scaling = cfg.alpha / cfg.r

    def forward(layer, x, y):
        a = layer.lora_A
        if a.dtype != x.dtype:
            a = a.to(x.dtype)
        # B ((R - I) (A x)): r-wide matmuls only, never a (d_out, d_in) matrix
        return ll.low_rank_update(F.linear(x, a), _core(layer, x.dtype), layer.lora_B, layer.lora_scaling, y)

    def merge(layer, weight, bias):
        # W' = W + s B (R - I) A: exactly what forward adds
        mid = _core(layer, torch.float32) @ layer.lora_A.float()
        return torch.addmm(weight, layer.lora_B.float(), mid, alpha=layer.lora_scaling), bias

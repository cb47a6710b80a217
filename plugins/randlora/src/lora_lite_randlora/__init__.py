"""RandLoRA: full-rank updates from shared random bases (Albert et al. 2025, https://arxiv.org/abs/2502.00987).

Paper: P. Albert, F. Z. Zhang, H. Saratchandran, C. Rodriguez-Opazo, A. van den Hengel,
E. Abbasnejad, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", ICLR 2025.

With ``m = min(d_in, d_out)``, ``M = max(d_in, d_out)`` and ``n = ceil(m / r)`` bases, the
update is a sum of ``n`` rank-r terms built from frozen random matrices and trained only
through diagonal scalings::

    dW = (alpha / r) * sum_i  B_i  diag(lambda_i)  A  diag(gamma_i)        (i = 1 .. n)

``A: (r, m)`` is one random matrix shared by every term, ``B_i: (M, r)`` a random matrix per
term, ``lambda_i: (r,)`` and ``gamma_i: (m,)`` the trainable diagonals (``lora_lambda``
``(r, n)``, ``lora_gamma`` ``(n, m)``). ``n r >= m``, so the sum can reach full rank. The
scalings sit on the side of width ``m``: for ``d_in <= d_out`` the product acts as written
(``(d_out, d_in) = (M, m)``); for ``d_in > d_out`` it is transposed, ``dW = (sum ...)^T``.
The forward never forms ``dW``: with ``S`` the ``(n r, m)`` stack of the scaled ``A`` and
``Bf`` the ``(M, n r)`` stack of the ``B_i``, it is ``y + s Bf S x`` (or ``y + s S^T Bf^T x``),
two matmuls through an ``n r ~ m``-wide intermediate, as PEFT computes it. ``S`` is built
as ``(lambda (x) gamma) * A`` so that autograd keeps only the small factors for backward, not
a second ``(n r, m)`` tensor (what PEFT's ``UniqueBaseGrad`` does by hand).

PEFT stacks ``S`` rank-major (row ``k n + i``) and ``Bf`` basis-major (column ``i r + k``), so
term ``i``'s scaled rows meet columns of other ``B_j``. We keep that pairing exactly, for
parity and for checkpoints that load into PEFT; since the ``B_i`` are i.i.d. random it is the
paper's sum over a relabelled set of random bases, not a different method.

Shared bases, as ``plugins/vera``'s projections: one frozen ``A: (r, 1, m_max)`` and
``B: (M_max, n_max, r)`` per attachment (``m_max = min`` and ``M_max = max`` of the largest
``d_out`` and ``d_in`` among the targets, PEFT's ``_find_dim``), registered on every target as
the same ``nn.Parameter``; each layer uses the leading slices. They are drawn from a CPU
``torch.Generator`` seeded with ``projection_prng_key``, exactly PEFT's draw: kaiming-uniform
(a = sqrt 5) in bfloat16, ``A`` then the ``n_max`` slices of ``B``, each matrix divided by its
own std (in bf16). PEFT draws in bf16 only where ``accelerate`` reports bf16 support (fp16
otherwise); we always draw in bf16, so the bases do not depend on the machine. ``sparse`` /
``very_sparse`` give PEFT's ternary bases (``{-1, 0, 1}`` with probability ``1/(2s)`` each for
``+-1``, ``s = 3`` or ``sqrt(m_max)``, divided by the std). They are regenerated at every
attach and load, and saved only with ``save_projection=True`` (PEFT's default is True).

Identity at init: ``lambda = 0``, so ``dW = 0`` exactly; ``gamma`` starts at
``1 / max(n, m)`` (PEFT's reset). Both are stored in fp32 whatever ``cfg.dtype``:
``gamma ~ 1/m`` is below bf16's resolution for lr-1e-4 steps. The bases in ``cfg.dtype``:
the dense ones are bf16 numbers, so bf16 storage loses nothing.

Scale: ``alpha / r``, as PEFT's ``randlora_alpha / r``; the defaults are PEFT's, ``r = 32``,
``alpha = 640`` (scale 20). Larger ``r`` means *fewer* trainable values (``n (r + m)`` per
layer, ``n = ceil(m / r)``), so this variant declares no size knob for budget matching.

Layers: any linear-like layer, quantized ones included: RandLoRA never reads the base weight
(``merge`` adds to the dense weight core hands it).

PEFT format (``lora_lite.export_peft`` / ``import_peft``), both ways and exact: PEFT's
``RANDLORA``, ``randlora_lambda`` / ``randlora_gamma`` per target (the same shapes); ``r``,
``alpha`` (PEFT's ``randlora_alpha``), ``projection_prng_key``, ``save_projection``, ``sparse``,
``very_sparse`` under PEFT's names. With ``save_projection=True`` the shared bases are written as
PEFT writes them: once as ``base_model.randlora_A`` / ``randlora_B`` and, because PEFT's layers
hold the shared buffers, again under every target (``<module>.randlora_A``); import copies the
file's pair in (so bases PEFT drew or changed are used as they are) and refuses per-target
copies that differ from it. Without it neither file holds them: both libraries draw them from
the key. ``randlora_dropout`` and ``init_weights`` are accepted and not modelled; ``bias``,
``fan_in_fan_out`` and ``modules_to_save`` are refused. One difference stays: PEFT draws the
dense bases in fp16 on a machine ``accelerate`` reports without bf16 support (we always draw in
bf16), so a ``save_projection=False`` adapter from such a machine has other bases: save with
``save_projection=True`` there.

Not implemented: ``randlora_dropout`` (dropout on the adapter's input), ``bias`` training and
``fan_in_fan_out`` (core's layer kinds give every layer as ``(d_out, d_in)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import lora_lite as ll


@dataclass
class RandLoraConfig(ll.LoraLiteConfig):
    variant: str = "randlora"
    r: int = 32  # PEFT's default; larger r -> fewer bases -> fewer trainable values
    alpha: float = 640.0  # PEFT's randlora_alpha default: scale alpha / r = 20
    projection_prng_key: int = 0
    save_projection: bool = False
    sparse: bool = False
    very_sparse: bool = False

    def validate(self):
        if self.sparse and self.very_sparse:
            raise ll.ConfigError("randlora: choose one of sparse=True and very_sparse=True, not both.")


def _n_bases(m: int, r: int) -> int:
    return -(-m // r)  # ceil: enough rank-r terms to reach rank m


def _bases(cfg, targets, device):
    """PEFT's shared (A, B), bit for bit: A (r, 1, m_max), B (M_max, n_max, r)."""
    d_out, d_in = max(t.d_out for t in targets), max(t.d_in for t in targets)
    big, small = max(d_out, d_in), min(d_out, d_in)
    n = _n_bases(small, cfg.r)
    g = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
    if cfg.sparse or cfg.very_sparse:
        s = math.sqrt(small) if cfg.very_sparse else 3.0
        draws = torch.rand((cfg.r, 1, small), generator=g), torch.rand((big, n, cfg.r), generator=g)
        ternary = []
        for u in draws:
            t = torch.zeros(u.shape)
            t[u < 1 / (2 * s)] = -1
            t[u > 1 - 1 / (2 * s)] = 1
            ternary.append(t / t.std())
        a, b = ternary
    else:
        def kaiming(shape):
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)

        a = kaiming((cfg.r, 1, small))
        b = torch.cat([kaiming((big, 1, cfg.r)) for _ in range(n)], dim=1)
        a, b = a / a.std(), b / b.std()
    frozen = lambda t: nn.Parameter(t.to(device=device, dtype=cfg.dtype), requires_grad=False)  # noqa: E731
    return frozen(a), frozen(b)


def factors(layer, d_out, d_in, dtype, device):
    """``(P, Q)`` with ``dW = scale * Q @ P``: P ``(k, d_in)``, Q ``(d_out, k)``, ``k = n r``."""
    lam, gam = layer.lora_lambda, layer.lora_gamma  # (r, n), (n, m)
    n, m = gam.shape
    a = layer.lora_randlora_A[:, :, :m].to(device, dtype)  # (r, 1, m)
    b = layer.lora_randlora_B[:, :n].to(device, dtype)  # (M_max, n, r)
    # (lambda (x) gamma) first: with A frozen, autograd then saves only lambda and gamma
    s = ((lam.to(dtype)[:, :, None] * gam.to(dtype)[None]) * a).flatten(0, 1)  # (r n, m), row k n + i
    bf = b[: max(d_out, d_in)].flatten(1)  # (M, n r), column i r + k
    if d_in == m:  # d_in <= d_out: dW = Bf S
        return s, bf
    return bf.T, s.T  # d_in > d_out: dW = S^T Bf^T


class RandLoRA:
    name = "randlora"
    config_class = RandLoraConfig
    additive = True  # y + delta(x)
    size_knob = None  # trainable count falls as r grows (n (r + m), n = ceil(m / r)): no monotone size knob
    lrs = (1e-4, 3e-4, 1e-3, 3e-3)
    # PEFT's RANDLORA: the shared bases once at model level and (PEFT's layers hold them) per target
    peft = ll.PeftFormat(
        {"lora_lambda": "randlora_lambda", "lora_gamma": "randlora_gamma",
         "lora_randlora_A": "randlora_A", "lora_randlora_B": "randlora_B"},
        {"fan_in_fan_out": False, "bias": "none"},
        peft_type="RANDLORA",
        config_fields={"r": "r", "alpha": "randlora_alpha", "projection_prng_key": "projection_prng_key",
                       "save_projection": "save_projection", "sparse": "sparse", "very_sparse": "very_sparse"},
        shared={"lora_randlora_A": "base_model.randlora_A", "lora_randlora_B": "base_model.randlora_B"},
        neutral=("randlora_dropout", "init_weights"),
    )

    def param_specs(d_in, d_out, cfg):
        m = min(d_in, d_out)
        n = _n_bases(m, cfg.r)
        shared = {"init": "empty", "trainable": False, "persistent": cfg.save_projection}
        return {
            "lora_lambda": ll.ParamSpec((cfg.r, n), init="zeros", keep_fp32=True),
            "lora_gamma": ll.ParamSpec((n, m), init=1.0 / max(n, m), keep_fp32=True),
            # placeholders, replaced in init by the attachment's one shared pair
            "lora_randlora_A": ll.ParamSpec((0,), **shared),
            "lora_randlora_B": ll.ParamSpec((0,), **shared),
        }

    def init(layer, cfg, targets):
        first = targets[0].layer
        if layer is first:
            first.lora_randlora_A, first.lora_randlora_B = _bases(cfg, targets, layer.lora_lambda.device)
        # the same Parameter object on every target: one copy in memory, kept shared by model.to()
        layer.lora_randlora_A, layer.lora_randlora_B = first.lora_randlora_A, first.lora_randlora_B
        layer.lora_scaling = cfg.alpha / cfg.r

    def forward(layer, x, y):
        p, q = factors(layer, y.shape[-1], x.shape[-1], x.dtype, x.device)
        return ll.low_rank_update(x, p, q, layer.lora_scaling, y)

    def merge(layer, weight, bias):
        p, q = factors(layer, *weight.shape, weight.dtype, weight.device)
        return torch.addmm(weight, q, p, alpha=layer.lora_scaling), bias

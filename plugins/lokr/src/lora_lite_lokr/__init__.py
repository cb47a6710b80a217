"""LoKr: low-rank Kronecker product adaptation (Yeh et al. 2024, LyCORIS, https://arxiv.org/abs/2309.14859;
Kronecker adapters after KronA, Edalati et al. 2022, https://arxiv.org/abs/2212.10650), as PEFT's ``lokr``.

Both widths are split into two factors, ``d_out = l k`` and ``d_in = m n`` (PEFT's
``factorization``: the divisor pair nearest the square root, or the one with a factor of
``decompose_factor``), and the update is a Kronecker product of a small and a large matrix::

    y' = y + s (W1 ⊗ W2) x,     s = alpha / r,     W1: (l, m),  W2: (k, n)

Either factor may itself be a rank-r product, as in PEFT: ``W2 = W2a W2b`` when ``r <
max(k, n) / 2``, and with ``decompose_both=True`` also ``W1 = W1a W1b`` when ``r < max(l,
m) / 2``; otherwise the factor is one full matrix (and ``r`` only enters the scale).
Tensors: ``lora_w1`` or ``lora_w1_a``/``lora_w1_b``, ``lora_w2`` or ``lora_w2_a``/``lora_w2_b``
(PEFT's ``lokr_*`` one to one).

Identity at init: PEFT's default (``init_weights="default"``) zeros ``W1`` (or ``W1a``)
and draws the rest kaiming-uniform (a=sqrt(5)), so ``W1 ⊗ W2 = 0``. ``"lycoris"`` zeros
``W2`` (or ``W2b``) instead and draws ``W1`` kaiming. Either way ``y' = y`` exactly. The
zeroed tensor follows ``cfg.dtype``; the kaiming-drawn ones are kept in fp32: their
gradients carry a factor of the zeroed one, so at bf16 storage their Adam steps round to
nothing (as measured for LoHa's factors, the same structure).

How the update is applied (``delta_form``). With ``x`` viewed as an (m, n) matrix ``X``,
``(W1 ⊗ W2) x`` is ``W1 X W2^T`` read row-major, so per token the hook can cost ``m k (n
+ l)`` multiply-adds (``"factorised"``: ``F.linear(X, W2)`` then ``W1 @``; through ``W2b``
then ``W2a`` when W2 is decomposed, ``m r (n + k) + l m k``) or ``d_in d_out``
(``"dense"``: ``F.linear(x, kron(W1, W2))``, PEFT's way, plus ``d_in d_out`` to build the
Kronecker product). ``"auto"`` (default) picks, per target at attach, the dense form for
layers of at most 256 x 256 weights and otherwise the form with fewer multiply-adds per
token (the dense one then wins only when a width is prime or tiny). Measured on one CPU
thread, train step of one d x d layer on 512 tokens (factorised / dense): d=64 0.56 / 0.35
ms, 192 1.30 / 1.22, 512 4.2 / 6.1, 1024 12.4 / 26.7, 2048 40 / 104: below ~256 the few
extra small matmuls of the factorised form cost more than they save. At d = 4096 (64 x 64)
the factorised form is 32x fewer multiply-adds and backward keeps ``m k`` numbers per token
instead of a d x d weight gradient. Both forms compute the same function (tested to float
rounding).

Layers: LoKr never reads the base weight, so every linear-like layer (``nn.Linear``,
GPT-2 ``Conv1D``, bitsandbytes 4/8-bit) works as it is.

PEFT format (``lora_lite.export_peft`` / ``import_peft``, needs core's
``PeftFormat(optional=...)``): PEFT's ``LOKR`` adapter, the factors a layer holds as
``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b`` and ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``
(same shapes; which ones follows from the layer's shape in both libraries), ``r``,
``alpha``, ``decompose_both`` and ``decompose_factor`` as PEFT's keys. ``delta_form`` and
``init_weights`` are not written (they do not change the function). Import accepts
``rank_dropout`` / ``module_dropout`` / ``rank_dropout_scale`` / ``init_weights`` /
``use_effective_conv2d`` whatever their values and refuses ``rank_pattern`` /
``alpha_pattern``, conv tensors (``lokr_t2``) and a file whose tensors on a layer are not
the ones this config gives it.

Not implemented from PEFT: convolutions (PEFT factorises the channels and keeps the
kernel in ``W2``: a layout other than lora-lite's flattened (out, in * kernel) view; not
declared), ``use_effective_conv2d``, ``rank_dropout`` / ``module_dropout`` /
``rank_dropout_scale`` (lora-lite variants take no dropout), ``init_weights=False``
(random, not the identity), ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_lite as ll

_FORMS = ("auto", "factorised", "dense")
_INITS = ("default", "lycoris")


@dataclass
class LoKrConfig(ll.LoraLiteConfig):
    variant: str = "lokr"
    # also split W1 (the small Kronecker factor) into a rank-r product when r < max(l, m) / 2
    decompose_both: bool = False
    # -1: split each width into the divisor pair nearest its square root; f > 0: use a factor f
    decompose_factor: int = -1
    # "default": W1 (or W1a) zeros, PEFT's init_weights=True; "lycoris": W2 (or W2b) zeros
    init_weights: str = "default"
    # "auto": the cheaper of "factorised" / "dense" at each target's shape (module docstring)
    delta_form: str = "auto"

    def validate(self):
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise ll.ConfigError(
                f"lokr decompose_factor must be -1 (near the square root) or a positive integer, got {self.decompose_factor}."
            )
        if self.init_weights not in _INITS:
            raise ll.ConfigError(f"lokr init_weights must be one of {_INITS}, got {self.init_weights!r}.")
        if self.delta_form not in _FORMS:
            raise ll.ConfigError(f"lokr delta_form must be one of {_FORMS}, got {self.delta_form!r}.")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(a, b)`` with ``a b = dimension``, as PEFT's LoKr splits a width.

    A positive ``factor`` that divides ``dimension`` is ``a`` as is (even if ``a > b``, as
    PEFT does). Otherwise, ``a <= b``: divisors are
    walked upwards from 1, keeping a pair while its sum does not grow and its small side
    stays <= ``factor`` (no cap for -1): the pair nearest the square root under that cap.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    cap = dimension if factor == -1 else factor
    a, b = 1, dimension
    while a < b:
        nxt = a + 1
        while dimension % nxt:
            nxt += 1
        if nxt + dimension // nxt > a + b or nxt > cap:
            break
        a, b = nxt, dimension // nxt
    return (a, b) if a <= b else (b, a)


def _shapes(d_in: int, d_out: int, cfg) -> tuple[int, int, int, int, bool, bool]:
    m, n = factorization(d_in, cfg.decompose_factor)
    l, k = factorization(d_out, cfg.decompose_factor)
    split_w1 = cfg.decompose_both and cfg.r < max(l, m) / 2
    split_w2 = cfg.r < max(k, n) / 2
    return l, k, m, n, split_w1, split_w2


def _cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dt else t.to(dt)


def _w1(layer, dt):
    if layer.lora_w1_split:
        return _cast(layer.lora_w1_a, dt) @ _cast(layer.lora_w1_b, dt)
    return _cast(layer.lora_w1, dt)


def _w2(layer, dt):
    if layer.lora_w2_split:
        return _cast(layer.lora_w2_a, dt) @ _cast(layer.lora_w2_b, dt)
    return _cast(layer.lora_w2, dt)


def _factorised(layer, x, y):
    dt = x.dtype
    w1 = _w1(layer, dt)
    m = w1.shape[1]
    xm = x.reshape(-1, m, x.shape[-1] // m)  # (tokens, m, n)
    if layer.lora_w2_split:  # through the rank-r factors, never building W2
        z = F.linear(F.linear(xm, _cast(layer.lora_w2_b, dt)), _cast(layer.lora_w2_a, dt))
    else:
        z = F.linear(xm, _cast(layer.lora_w2, dt))  # (tokens, m, k)
    return torch.add(y, torch.matmul(w1, z).reshape(y.shape), alpha=layer.lora_scaling)  # W1 X W2^T


def _dense(layer, x, y):
    dt = x.dtype
    return torch.add(y, F.linear(x, torch.kron(_w1(layer, dt), _w2(layer, dt))), alpha=layer.lora_scaling)


_DENSE_BELOW = 256 * 256  # weights up to this size take the dense form under "auto" (measured)


class LoKr:
    name = "lokr"
    config_class = LoKrConfig
    layer_kinds = ("linear-like",)
    additive = True  # y + delta(x): rows of a batch may use different attachments
    _FACTORS = ("lora_w1", "lora_w1_a", "lora_w1_b", "lora_w2", "lora_w2_a", "lora_w2_b")
    # PEFT's LOKR: lokr_* one to one; which of them a layer holds follows from its shape (optional)
    peft = ll.PeftFormat(
        {k: k.replace("lora_", "lokr_") for k in _FACTORS},
        peft_type="LOKR",
        config_fields={"r": "r", "alpha": "alpha", "decompose_both": "decompose_both",
                       "decompose_factor": "decompose_factor"},
        optional=_FACTORS,
        # init_weights (lora-lite's "default"/"lycoris" = PEFT's True/"lycoris") only picks the zeroed
        # factor; use_effective_conv2d has no effect on linear layers (a conv file's lokr_t2 is refused)
        neutral=("rank_dropout", "module_dropout", "rank_dropout_scale", "init_weights", "use_effective_conv2d"),
    )

    def param_specs(d_in, d_out, cfg):
        l, k, m, n, split_w1, split_w2 = _shapes(d_in, d_out, cfg)
        lycoris = cfg.init_weights == "lycoris"

        def spec(shape, zero):
            # the zeroed tensor follows cfg.dtype; kaiming-drawn ones stay fp32 (module docstring)
            return ll.ParamSpec(shape, init="zeros" if zero else "kaiming", keep_fp32=not zero)

        specs = {}
        if split_w1:
            specs["lora_w1_a"], specs["lora_w1_b"] = spec((l, cfg.r), not lycoris), spec((cfg.r, m), False)
        else:
            specs["lora_w1"] = spec((l, m), not lycoris)
        if split_w2:
            specs["lora_w2_a"], specs["lora_w2_b"] = spec((k, cfg.r), False), spec((cfg.r, n), lycoris)
        else:
            specs["lora_w2"] = spec((k, n), lycoris)
        return specs

    def init(layer, cfg):
        layer.lora_scaling = cfg.alpha / cfg.r
        layer.lora_w1_split = hasattr(layer, "lora_w1_a")
        layer.lora_w2_split = hasattr(layer, "lora_w2_a")
        (l, m), (k, n) = _w1(layer, torch.float32).shape, _w2(layer, torch.float32).shape
        form = cfg.delta_form
        if form == "auto":
            second = m * cfg.r * (n + k) if layer.lora_w2_split else m * n * k
            small = (l * k) * (m * n) <= _DENSE_BELOW  # a few small matmuls cost more than one dense one
            form = "factorised" if not small and second + l * m * k < (l * k) * (m * n) else "dense"
        layer.lora_op = _factorised if form == "factorised" else _dense

    def forward(layer, x, y):
        return layer.lora_op(layer, x, y)

    def merge(layer, weight, bias):
        # W' = W + s kron(W1, W2)
        delta = torch.kron(_w1(layer, torch.float32), _w2(layer, torch.float32))
        return torch.add(weight, delta, alpha=layer.lora_scaling), bias

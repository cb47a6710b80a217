"""AntiPaSTO: SVD steering with learnable singular-value deltas and a block-diagonal Cayley
rotation of one singular basis (wassname 2026, https://arxiv.org/abs/2601.07473; code
https://github.com/wassname/AntiPaSTO, and the variant ``antipasto`` of wassname/lora-lite,
whose math, knob names and calibration this follows).

With r triplets ``U`` (d_out, r), ``S`` (r), ``Vh`` (r, d_in) of the frozen weight's SVD
(the top r by singular value; or, with calibration data, the r that score highest, below),
upstream rewrites the weight into ``W_res = W - U diag(S) Vh`` and adds the adapted triplets
back::

    y = W_res x + U_eff diag(S + delta_s) Vh_eff x
    R = block_diag(C(A_1), ..., C(A_{r/bs})),   C(A) = (I - A/2)^-1 (I + A/2)
    A_j = a tanh(skew(T_j) / a),  skew(T) = (T - T^T) / 2 on the strict upper triangle T,  a = 2 tan(max_angle / 2)
    rotate_basis "V": Vh_eff = R Vh  (input side)     "U": U_eff = U R^T  (output side)     "none": no R

Trainable: ``delta_s`` (r) and ``rot_T``: r/bs blocks of bs(bs-1)/2 generators, stored flat in
upstream's order (upstream's ``(n_blocks, bs(bs-1)/2)`` tensor, flattened). Where ``bs`` does not
divide ``r`` (upstream refuses) a last block of ``r % bs`` dimensions takes the rest. The tanh
bounds each generator entry so a single-plane rotation turns by at most ``max_rotation_angle``
radians.

This plugin never writes ``W``: the hook adds the same function's change to the frozen output::

    y' = y + U M Vh x,   M = diag(S + delta_s) (R - I) + diag(delta_s)          ("V")
                         M = (R^T - I) diag(S + delta_s) + diag(delta_s)        ("U")

with ``R - I = solve(I - A/2, A)`` blockwise (no cancellation against ``I``). That is upstream's
``W_res x + ...`` rearranged, but the weight is only read, so bitsandbytes layers work and
identity at init is exact.

Identity at init: ``rot_T = 0`` gives ``R = I`` exactly and ``delta_s = 0`` (default) makes
``M = 0``: ``y' = y`` bit for bit. ``delta_s_init="antipasto3"`` draws upstream's
``4e-4 + N(0, 4e-4^2)`` (a small positive bias that breaks the sign symmetry of a rotation; the
start is then off the identity by ``U diag(delta_s) Vh``). Gradients of both tensors at zero are
non-zero. Trainable tensors and ``S`` are kept in fp32 whatever ``cfg.dtype``.

Calibration (``group_init``, upstream's Wanda-style selection, optional): with
``calibration_data`` the model runs once with temporary pre-hooks that accumulate, per target,
the mean of ``|Vh_full x|`` over all tokens for every singular direction of the full SVD; the r
triplets with the largest ``S_i * mean|v_i^T x|`` are kept (in ascending index order). Without
data the top r by ``S`` are kept. Padding tokens are not masked.

Reload without calibration data (upstream's cannot: it keeps the choice only in a ``W_res`` that
``load`` does not recompute): ``U``, ``S``, ``Vh`` are persistent frozen tensors
(``save_factors=True``, default), so a checkpoint holds which triplets were chosen and ``load``
copies them over ``init``'s top-r SVD: exact, with no data, on any machine. ``save_factors=False``
saves only the trained tensors and recomputes the top-r SVD at load: allowed only without
calibration data (``CalibrationError`` otherwise, since the choice would be lost).

SVD: ``torch.linalg.svd`` in fp32 (fp64 for an fp64 weight), each triplet signed so its
``u_i``'s largest-magnitude entry is positive (recomputation does not depend on LAPACK's signs).

Layers: every kind ``lora_lite.dense_weight`` reads: ``nn.Linear``, transformers ``Conv1D``,
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (SVD of the dequantized weight). Upstream supports
only plain ``nn.Linear``.

Not implemented from upstream: nothing of the adapter's math. Not ported: antipasto3's runtime
steering interface (a per-call coefficient with R(+alpha) / R(-alpha)), as upstream's lite port
also leaves it out. ``alpha`` is unused (upstream has no scale).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class AntiPaSTOConfig(ll.LoraLiteConfig):
    variant: str = "antipasto"
    block_size: int = 4
    max_rotation_angle: float = 0.5
    rotate_basis: Literal["V", "U", "none"] = "V"
    delta_s_init: Literal["zeros", "antipasto3"] = "zeros"
    save_factors: bool = True

    def validate(self):
        if self.rotate_basis != "none" and self.block_size < 2:
            raise ll.ConfigError(f"antipasto block_size must be >= 2 to rotate anything, got {self.block_size}.")
        if self.block_size < 1:
            raise ll.ConfigError(f"antipasto block_size must be >= 1, got {self.block_size}.")
        if not 0.0 < self.max_rotation_angle < math.pi:
            raise ll.ConfigError(f"antipasto max_rotation_angle must be in (0, pi) radians, got {self.max_rotation_angle}.")


def full_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every triplet of ``w``'s SVD (fp32, or fp64 for fp64), each signed so max |u_i| entry > 0."""
    u, s, vh = torch.linalg.svd(w.detach().to(torch.promote_types(w.dtype, torch.float32)), full_matrices=False)
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    sign[sign == 0] = 1
    return u * sign, s, vh * sign[0][:, None]


@functools.lru_cache(maxsize=64)
def _generator_index(r: int, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each generator goes in the padded blocks (ceil(r/bs), bs, bs): block-major, then each
    block's strict upper triangle row-major (upstream's ``(n_blocks, bs(bs-1)/2)`` order when bs
    divides r); a last block of ``r % bs`` dimensions uses only its leading rows and columns."""
    rows, cols = torch.triu_indices(bs, bs, 1)
    blocks, out_r, out_c = [], [], []
    for j in range(-(-r // bs)):
        size = min(bs, r - j * bs)
        keep = cols < size
        blocks.append(torch.full((int(keep.sum()),), j))
        out_r.append(rows[keep])
        out_c.append(cols[keep])
    return torch.cat(blocks), torch.cat(out_r), torch.cat(out_c)


def n_generators(r: int, bs: int) -> int:
    return (r // bs) * (bs * (bs - 1) // 2) + (r % bs) * (r % bs - 1) // 2


def rotation_minus_identity(rot_t: torch.Tensor, r: int, bs: int, max_angle: float) -> torch.Tensor:
    """``R - I`` (r x r, block-diagonal) for the flat generators ``rot_t`` (``n_generators(r, bs)``)."""
    n = -(-r // bs)
    index = tuple(i.to(rot_t.device) for i in _generator_index(r, bs))
    t = rot_t.new_zeros(n, bs, bs).index_put(index, rot_t)
    limit = 2.0 * math.tan(max_angle / 2.0)
    a = torch.tanh((t - t.transpose(1, 2)) * (0.5 / limit)) * limit
    eye = torch.eye(bs, dtype=a.dtype, device=a.device)
    # (I - A/2)^-1 (I + A/2) - I = (I - A/2)^-1 A; a padded block's unused rows/columns stay 0
    blocks = torch.linalg.solve(eye - 0.5 * a, a)
    return torch.block_diag(*blocks.unbind(0))[:r, :r]


def core(layer, dtype: torch.dtype) -> torch.Tensor:
    """``M`` (r x r) with ``y' = y + U M Vh x``, in ``dtype`` (computed in at least fp32)."""
    cfg = layer.lora_cfg
    work = torch.promote_types(dtype, torch.float32)
    ds = layer.lora_delta_s.to(work)
    rot_t = getattr(layer, "lora_rot_T", None)
    if rot_t is None:  # rotate_basis="none", or r=1: nothing to rotate
        return torch.diag(ds).to(dtype)
    rmi = rotation_minus_identity(rot_t.to(work), cfg.r, cfg.block_size, cfg.max_rotation_angle)
    sigma = layer.lora_S.to(work) + ds
    m = sigma[:, None] * rmi if cfg.rotate_basis == "V" else rmi.T * sigma[None, :]
    return (m + torch.diag(ds)).to(dtype)


def _antipasto3_delta(t: torch.Tensor) -> None:
    t.normal_(0.0, 4e-4).add_(4e-4)


# -- calibration ------------------------------------------------------------------------------


def activation_scores(model, targets, vhs: dict[str, torch.Tensor], calibration_data) -> dict[str, torch.Tensor]:
    """``{target: mean over tokens of |Vh_full x|}`` (one number per singular direction)."""
    sums = {t.name: 0.0 for t in targets}
    counts = {t.name: 0 for t in targets}

    def capture(name):
        def hook(module, args):
            x = args[0].detach()
            vh = vhs[name]
            h = F.linear(x.reshape(-1, x.shape[-1]).to(vh.dtype), vh)
            sums[name] = sums[name] + h.abs().sum(0).double()
            counts[name] += h.shape[0]
        return hook

    ll.run_calibration(model, calibration_data, variant="antipasto", why="selects singular triplets from activations",
                       pre_hooks=[(t.host, capture(t.name)) for t in targets])
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise ll.CalibrationError(f"antipasto: calibration reached no input of {empty[:3]}; pass at least one batch.")
    return {n: sums[n] / counts[n] for n in sums}


class AntiPaSTO:
    name = "antipasto"
    config_class = AntiPaSTOConfig
    additive = True  # y + delta(x): rows of a batch may use different attachments
    lrs = (1e-3, 3e-3, 1e-2, 3e-2)  # r + 3r/2 numbers per layer at bs=4; upstream trains at 5e-3

    def param_specs(d_in, d_out, cfg):
        r = cfg.r
        if r > min(d_in, d_out):
            raise ll.ConfigError(
                f"antipasto r={r} exceeds min(d_in, d_out)={min(d_in, d_out)} of a target (the SVD has no "
                "more triplets); lower r or narrow the targets."
            )
        frozen = {"init": "empty", "trainable": False, "persistent": cfg.save_factors}
        delta_init = "zeros" if cfg.delta_s_init == "zeros" else _antipasto3_delta
        specs = {
            "lora_U": ll.ParamSpec((d_out, r), **frozen),
            "lora_S": ll.ParamSpec((r,), keep_fp32=True, **frozen),
            "lora_Vh": ll.ParamSpec((r, d_in), **frozen),
            "lora_delta_s": ll.ParamSpec((r,), init=delta_init, keep_fp32=True),
        }
        if cfg.rotate_basis != "none" and n_generators(r, cfg.block_size):
            specs["lora_rot_T"] = ll.ParamSpec((n_generators(r, cfg.block_size),), init="zeros", keep_fp32=True)
        return specs

    def init(layer, cfg):
        # the top r by singular value; group_init may choose others, and load copies the saved ones
        u, s, vh = full_svd(ll.dense_weight(layer))
        with torch.no_grad():
            layer.lora_U.copy_(u[:, : cfg.r])
            layer.lora_S.copy_(s[: cfg.r])
            layer.lora_Vh.copy_(vh[: cfg.r])

    def group_init(model, targets, cfg, calibration_data):
        if calibration_data is None:
            return  # keep init's top-r choice
        if not cfg.save_factors:
            raise ll.CalibrationError(
                "antipasto with calibration_data chooses which singular triplets to adapt, and save_factors=False "
                "would not save that choice (load recomputes the top-r SVD). Keep save_factors=True, or attach "
                "without calibration_data."
            )
        svds = {t.name: full_svd(ll.dense_weight(t.layer)) for t in targets}
        scores = activation_scores(model, targets, {n: v[2] for n, v in svds.items()}, calibration_data)
        with torch.no_grad():
            for t in targets:
                u, s, vh = svds[t.name]
                idx = (s.double().cpu() * scores[t.name].cpu()).argsort(descending=True)[: cfg.r].sort().values
                idx = idx.to(u.device)
                t.layer.lora_U.copy_(u[:, idx])
                t.layer.lora_S.copy_(s[idx])
                t.layer.lora_Vh.copy_(vh[idx])

    def forward(layer, x, y):
        vh = layer.lora_Vh
        if vh.dtype != x.dtype:
            vh = vh.to(x.dtype)
        # U (M (Vh x)): r-wide matmuls only, never a (d_out, d_in) matrix
        return ll.low_rank_update(F.linear(x, vh), core(layer, x.dtype), layer.lora_U, 1.0, y)

    def merge(layer, weight, bias):
        # W' = W + U M Vh: exactly what forward adds
        mv = core(layer, torch.float32) @ layer.lora_Vh.float()
        return torch.addmm(weight, layer.lora_U.float(), mv), bias

"""SVFT: singular vectors guided fine-tuning (Lingam et al. 2024, https://arxiv.org/abs/2405.19597).

With the SVD of the frozen weight ``W = U S V^T`` (``(d_out, d_in)``; its top ``n`` triplets,
``n = r``, or all ``min(d_in, d_out)`` when ``r = 0``), SVFT freezes ``U`` and ``V`` and trains
a sparse ``n x n`` matrix ``M`` between them::

    y' = y + U M V^T x,        M = sum over the pattern's (i, j) of m_ij e_i e_j^T

``M``'s sparsity pattern is the knob ``pattern``:

- ``"plain"``: the diagonal (``n`` numbers; SVFT^P),
- ``"banded"``: the diagonal and ``off_diag`` bands on each side (SVFT^B_d;
  ``n (2d + 1) - d (d + 1)`` numbers),
- ``"random"``: as many distinct positions as banded would have, drawn with a CPU
  ``torch.Generator`` seeded by ``seed`` (SVFT^R_d),
- ``"top_k"``: as many positions, the largest ``|u_i^T v_j|`` (the alignment of left and right
  singular vectors; square layers only, where both are ``d``-vectors) (SVFT^T_d).

Identity at init: ``M = 0`` (its values ``lora_M`` start at zero), so the update is exactly
zero; ``M``'s gradient ``U^T g x^T V`` restricted to the pattern is not zero there, because
``U`` and ``V`` are fixed and non-zero. ``lora_M`` is kept in fp32 whatever ``cfg.dtype``.
``alpha`` is not used (no scale: ``M`` is in the units of the singular values).

SVD and reload: exact ``torch.linalg.svd`` in fp32 of ``lora_lite.dense_weight(layer)``, each
pair's sign fixed so that the largest-magnitude entry of ``u_i`` is positive (so a recomputed
SVD gives the same factors up to rounding). As ``lora_xs``: with ``save_factors=True``
(default) ``U`` and ``V`` are saved (frozen, ``n (d_in + d_out)`` numbers) and a reload copies
them in, exact on any machine; ``save_factors=False`` saves only ``M`` and the pattern and
recomputes the SVD on load, exact on the same software and hardware. The pattern's positions
are always saved (``lora_rows``, ``lora_cols``: frozen fp32, exact below 2^24), so a top-k or
random pattern reloads as trained.

Layers: every layer kind whose weight lora-lite can read through ``lora_lite.dense_weight``:
``nn.Linear``, transformers ``Conv1D``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (the
SVD is of the dequantized weight, exactly what the frozen base computes with; the weight is
never written, so identity at init is exact there too). Storage nothing can read raises
``WeightAccessError`` at attach.

Differences from the authors' code (github.com/VijayLingam95/SVFT): it rebuilds the layer as
``U (S + M) V^T`` (with ``r`` below full rank that drops ``W``'s residual, so the start is not
the base model); here ``W`` stays and only ``U M V^T`` is added. It draws ``M``'s values
kaiming-normal behind a sigmoid gate initialised at 0 (a non-identity start); here
``M = 0`` and no gate (at ``M = 0`` a gate gets no gradient). Its random pattern draws positions
with repeats from the global RNG; here they are distinct and seeded. Its top-k scores
``U V^T`` (rows, not singular vectors) with the sign kept; here ``|U^T V|``, the paper's
alignment, sign-free because singular pairs have no sign. ``fill_orthonormal`` is not
implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class SVFTConfig(ll.LoraLiteConfig):
    """``r``: singular triplets kept (0, the default: all, as the paper); ``pattern``: M's
    sparsity; ``off_diag``: band half-width d (banded), or the banded count's d (random,
    top_k); ``seed``: the random pattern's; ``save_factors``: save U and V (see module doc)."""

    variant: str = "svft"
    r: int = 0
    pattern: Literal["plain", "banded", "random", "top_k"] = "plain"
    off_diag: int = 0
    seed: int = 0
    save_factors: bool = True

    r_min: ClassVar[int] = 0  # 0 = every singular triplet

    def validate(self):
        if self.off_diag < 0:
            raise ll.ConfigError(f"svft off_diag must be >= 0, got {self.off_diag}.")
        if self.pattern == "plain" and self.off_diag:
            raise ll.ConfigError(
                f"svft pattern='plain' is the diagonal only; off_diag={self.off_diag} needs pattern='banded' "
                "(or 'random' / 'top_k' with that many entries)."
            )
        if self.pattern == "banded" and not self.off_diag:
            raise ll.ConfigError("svft pattern='banded' needs off_diag >= 1 (off_diag=0 is pattern='plain').")


def svd_factors(w: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_n, V_n^T)`` of ``w`` in float32, each pair's sign fixed (largest |u_i| entry positive)."""
    u, _, vh = torch.linalg.svd(w.detach().to(torch.float32), full_matrices=False)
    u, vh = u[:, :n], vh[:n]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    sign[sign == 0] = 1
    return u * sign, vh * sign[0][:, None]


def entry_count(n: int, d: int) -> int:
    """Entries of an n x n band of half-width d: ``n (2d + 1) - d (d + 1)``."""
    return n * (2 * d + 1) - d * (d + 1)


def pattern_positions(pattern: str, n: int, d: int, seed: int, u=None, vh=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns (long, row-major order) of M's trainable entries."""
    if pattern in ("plain", "banded"):
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = (i - j).abs() <= d
        return i[keep], j[keep]
    k = entry_count(n, d)
    if pattern == "random":
        g = torch.Generator(device="cpu").manual_seed(seed)
        flat = torch.randperm(n * n, generator=g)[:k]
    else:  # top_k: the k largest alignments |u_i^T v_j|
        scores = (u.T.double() @ vh.T.double()).abs().cpu()
        flat = torch.topk(scores.flatten(), k).indices
    flat = flat.sort().values
    return flat // n, flat % n


def dense_m(layer, dtype) -> torch.Tensor:
    n = layer.lora_U.shape[1]
    rows, cols = layer.lora_rows.long(), layer.lora_cols.long()
    m = torch.zeros(n, n, dtype=dtype, device=layer.lora_M.device)
    return m.index_put((rows, cols), layer.lora_M.to(dtype))


class SVFT:
    name = "svft"
    additive = True  # y + delta(x): rows of a batch may use different attachments
    config_class = SVFTConfig
    size_knob = None  # plain at r=0 is fixed by the shapes; off_diag is the size for the other patterns
    lrs = (1e-3, 3e-3, 1e-2, 3e-2)  # a few numbers per singular direction; the paper trains M at 1e-3..5e-2

    def param_specs(d_in, d_out, cfg):
        full = min(d_in, d_out)
        if cfg.r > full:
            raise ll.ConfigError(
                f"svft r={cfg.r} exceeds min(d_in, d_out)={full} of a target (the SVD has no more triplets); "
                "lower r, or use r=0 for all of them."
            )
        n = cfg.r or full
        if cfg.off_diag >= n:
            raise ll.ConfigError(
                f"svft off_diag={cfg.off_diag} needs more than {n} singular triplets on a target "
                f"({d_out} x {d_in}, r={cfg.r}); lower off_diag."
            )
        if cfg.pattern == "top_k" and d_in != d_out:
            raise ll.ConfigError(
                f"svft pattern='top_k' scores |u_i^T v_j|, which needs d_in == d_out; a target is {d_out} x {d_in}. "
                "Restrict target_names to square layers or use another pattern."
            )
        k = entry_count(n, cfg.off_diag)
        frozen = {"init": "empty", "trainable": False, "persistent": cfg.save_factors}
        index = {"init": "empty", "trainable": False, "keep_fp32": True}
        return {
            "lora_M": ll.ParamSpec((k,), init="zeros", keep_fp32=True),
            "lora_U": ll.ParamSpec((d_out, n), **frozen),
            "lora_V": ll.ParamSpec((n, d_in), **frozen),
            "lora_rows": ll.ParamSpec((k,), **index),
            "lora_cols": ll.ParamSpec((k,), **index),
        }

    def init(layer, cfg):
        n = layer.lora_U.shape[1]
        u, vh = svd_factors(ll.dense_weight(layer), n)
        rows, cols = pattern_positions(cfg.pattern, n, cfg.off_diag, cfg.seed, u, vh)
        with torch.no_grad():
            layer.lora_U.copy_(u)
            layer.lora_V.copy_(vh)
            layer.lora_rows.copy_(rows)
            layer.lora_cols.copy_(cols)

    def forward(layer, x, y):
        u, v = layer.lora_U, layer.lora_V
        if u.dtype != x.dtype:
            u, v = u.to(x.dtype), v.to(x.dtype)
        h = F.linear(x, v)  # V^T x: n numbers per token
        if layer.lora_cfg.pattern == "plain":
            h = h * layer.lora_M.to(x.dtype)
        else:  # n x n, built once per call (not per token) from the k values
            h = F.linear(h, dense_m(layer, x.dtype))
        return y + F.linear(h, u)

    def merge(layer, weight, bias):
        # W' = W + U M V^T: exactly what forward adds
        m = dense_m(layer, torch.float32)
        return weight + layer.lora_U.float() @ m @ layer.lora_V.float(), bias

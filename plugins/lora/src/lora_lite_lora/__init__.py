"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

Equation, for a frozen layer ``y = W x (+ b)``::

    y' = y + s B A drop(x),   s = alpha / r  (alpha / sqrt(r) with use_rslora),
    A: (r, d_in), B: (d_out, r)

Identity at init: ``A`` is kaiming-uniform (as ``nn.Linear`` and PEFT initialise it),
``B`` is zeros, so ``B A x = 0`` and ``y' = y`` exactly; the first gradient step moves
``B`` (its gradient ``s dy (A x)^T`` is non-zero), then ``A``.

Knobs (PEFT's ``LoraConfig`` names in brackets):

- ``dropout`` (``lora_dropout``), in [0, 1): inverted dropout on the adapter's input only
  (the base layer sees ``x`` unchanged), active only while the layer is in training mode.
  With ``dropout == 0`` no dropout code is on the path at all (decided at attach). An
  embedding's adapter has no dropout (its input is token ids; PEFT does not apply it either).
- ``use_rslora`` (``use_rslora``): rank-stabilised scale ``alpha / sqrt(r)`` (Kalajdzievski
  2023, https://arxiv.org/abs/2312.03732), so the update's size does not shrink as r grows.
- ``hotswap_rank`` (PEFT's ``prepare_model_for_compiled_hotswap(target_rank=...)``): 0 (off)
  or >= r: ``A`` (R, d_in) and ``B`` (d_out, R) padded with zeros (identity and training
  unchanged: the padded rows and columns get zero gradients), the scale a (1,) tensor
  ``lora_scale``; the ``hotswap`` hook then loads any LoRA adapter of rank <= R and any alpha
  in place (``ll.load(model, path, name=...)``) without a ``torch.compile`` recompile.
- ``init`` (``init_lora_weights``): ``"default"`` (kaiming-uniform A, zero B; PEFT's
  ``True``), ``"gaussian"`` (A ~ N(0, 1/r^2), zero B; PEFT's ``"gaussian"``), ``"olora"``
  (OLoRA, Büyükakyüz 2024, https://arxiv.org/abs/2406.01775: with the QR decomposition
  ``W = Q R``, ``B = Q[:, :r]``, ``A = R[:r]`` and the base weight becomes
  ``W_res = W - s B A``; identity at init ``W_res x + s B A x = W x`` holds to fp32
  rounding). Both zero-B inits are exact identities.

Layers: any linear-like layer. With ``init="default"``/``"gaussian"`` LoRA never reads the
base weight, so quantized layers (bitsandbytes 4/8-bit) work as they are. ``init="olora"``
reads and rewrites the weight through ``lora_lite.dense_weight`` /
``lora_lite.replace_dense_weight`` (``detach`` restores the original storage bit for bit),
needs ``r <= min(d_in, d_out)`` (``ConfigError``), and refuses quantized layers
(``WeightAccessError``: ``W_res`` could only be stored requantized) and embeddings and
convolutions (``ConfigError``). Also, named by ``target_names``, ``nn.Embedding`` and
``nn.Conv1d``/``nn.Conv2d`` as PEFT does them: an embedding's ``A`` (r, vocab) is a second
lookup table (zeros at init, ``B`` normal: PEFT's choice whatever ``init``),
``delta = s B A[:, x]``; a convolution's ``A`` is a conv with the layer's kernel, stride,
padding and dilation into ``r`` channels and ``B`` a 1x1 conv back,
``delta = s conv_B(conv_A(drop(x)))``. Every one of these is ``W + s B A`` on the layer's
(d_out, d_in) weight view, which is what ``merge`` writes (dropout is off in a merged model,
as in eval mode).

PEFT: ``export_peft`` writes ``use_rslora``, ``lora_dropout`` and ``init_lora_weights``
from the knobs and ``import_peft`` reads them back. An OLoRA adapter is exported as PEFT
exports one with ``path_initial_model_for_weight_conversion``: a rank-``2r`` LoRA against
the original weight, ``[A; A0]``, ``[B, -B0]`` (``s B0 A0 = W - W_res``), which loads onto an
unmodified base. Not implemented from PEFT's ``init_lora_weights``: ``"loftq"`` (it
replaces the base weight by its NF4/int quantization, which needs PEFT's quantizer or
bitsandbytes and a quantized base layout lora-lite does not write; quantize the model
first and attach plain LoRA, or use PEFT's ``replace_lora_weights_loftq``), ``False``
(random B: not an identity at init), and the data-driven or base-rewriting inits that
have their own plugins (``"pissa"``, ``"eva"``, ``"corda"``, ``"lora_ga"``: plugins/<name>) or
none yet (``"orthogonal"``, ``"mica"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_lite as ll
from lora_lite.functional import low_rank_update

_CONV = {"torch-conv1d": F.conv1d, "torch-conv2d": F.conv2d}
INITS = ("default", "gaussian", "olora")


@dataclass
class LoRAConfig(ll.LoraLiteConfig):
    """LoRA's knobs; see the module docstring. ``dropout`` in [0, 1), ``init`` one of
    ``"default"``, ``"gaussian"``, ``"olora"``."""

    variant: str = "lora"
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    hotswap_rank: int = 0

    def validate(self) -> None:
        if self.hotswap_rank and self.hotswap_rank < self.r:
            raise ll.ConfigError(f"lora hotswap_rank must be 0 (off) or >= r={self.r}, got {self.hotswap_rank}.")
        if self.hotswap_rank and (self.dropout or self.init == "olora"):
            raise ll.ConfigError("lora hotswap_rank does not combine with dropout or init='olora' yet.")
        if not 0.0 <= self.dropout < 1.0:
            raise ll.ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}.")
        if self.init == "loftq":
            raise ll.ConfigError(
                "lora init='loftq' is not implemented: LoftQ replaces the base weight by its quantization, which "
                "needs a quantizer lora-lite does not ship. Quantize the model (bitsandbytes) and attach plain LoRA, "
                f"or use PEFT for LoftQ. Implemented inits: {INITS}."
            )
        if self.init not in INITS:
            raise ll.ConfigError(f"lora init must be one of {INITS}, got {self.init!r}.")


def _gaussian(r: int):
    def fill(t: torch.Tensor) -> None:
        torch.nn.init.normal_(t, std=1 / r)  # PEFT's "gaussian": std 1/r, not 1/sqrt(r)

    return fill


def _scale(cfg) -> float:
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


def _padded_kaiming(r: int):
    """Kaiming-uniform rows 0..r-1 (nn.Linear's and PEFT's bound 1/sqrt(d_in)), zeros below."""
    def fill(t: torch.Tensor) -> None:
        t.zero_()
        bound = 1.0 / math.sqrt(t.shape[1])
        t[:r].uniform_(-bound, bound)

    return fill


def _padded_delta(layer, x, y):
    # hot-swappable: the rank is padded to hotswap_rank with zeros and the scale is a tensor,
    # so loading an adapter of another rank or alpha changes values, never shapes or constants
    a, b, s = layer.lora_A, layer.lora_B, layer.lora_scale
    if a.dtype != x.dtype:
        a, b, s = a.to(x.dtype), b.to(x.dtype), s.to(x.dtype)
    return y + F.linear(F.linear(x, a) * s, b)


def _linear_dropout(layer, x, y):
    if layer.training:
        x = F.dropout(x, layer.lora_p, True)
    return ll.low_rank_update(x, layer.lora_A, layer.lora_B, layer.lora_scaling, y)


def _embedding_delta(layer, x, y):
    h = F.embedding(x, layer.lora_A.T.to(y.dtype), padding_idx=layer.padding_idx)
    return torch.add(y, F.linear(h, layer.lora_B.to(y.dtype)), alpha=layer.lora_scaling)


def _conv_delta(layer, x, y):
    conv = layer.lora_conv
    h = conv(x, layer.lora_A.to(x.dtype), None, layer.stride, layer.padding, layer.dilation)
    return torch.add(y, conv(h, layer.lora_B.to(x.dtype)), alpha=layer.lora_scaling)


def _conv_dropout_delta(layer, x, y):
    if layer.training:
        x = F.dropout(x, layer.lora_p, True)
    return _conv_delta(layer, x, y)


def _olora(layer, cfg, scale: float) -> None:
    """A = R[:r], B = Q[:, :r] of W = Q R (PEFT's olora_init); the base keeps W - s B A."""
    w = ll.dense_weight(layer)
    q, rr = torch.linalg.qr(w.detach().float())
    with torch.no_grad():
        layer.lora_A.copy_(rr[: cfg.r])
        layer.lora_B.copy_(q[:, : cfg.r])
        # subtract what the stored (possibly bf16-rounded) factors add back
        w_res = torch.addmm(w.detach().float(), layer.lora_B.float(), layer.lora_A.float(), alpha=-scale)
    ll.replace_dense_weight(layer, w_res.to(w.dtype))


def _whole(w: torch.Tensor) -> torch.Tensor:
    """The full tensor in float64 on CPU (a sharded DTensor is gathered: every rank calls it)."""
    w = w.full_tensor() if callable(getattr(w, "full_tensor", None)) else w
    return w.detach().to("cpu", torch.float64)


def _to_peft(layer, cfg, t):
    """Export: the tensors as they are (padded ones at rank ``hotswap_rank``, with the alpha
    that gives their live scale), except after ``init="olora"``: then the rank-2r LoRA
    against the original weight, A' = [A; A0], B' = [B, -B0] with s B0 A0 = W - W_res (read
    back from the weight the init replaced), and alpha' that keeps PEFT's scale at s."""
    if cfg.hotswap_rank:  # padded: PEFT gets rank R (the zero rows add nothing) and alpha for the live scale
        big, s = cfg.hotswap_rank, float(layer.lora_scale)
        return t, big, s * (math.sqrt(big) if cfg.use_rslora else big)
    if cfg.init != "olora":
        return t, cfg.r, cfg.alpha
    s, r = layer.lora_scaling, cfg.r
    u, sv, vh = torch.linalg.svd((_whole(ll.original_weight(layer)) - _whole(ll.dense_weight(layer))) / s,
                                 full_matrices=False)
    root = sv[:r].sqrt()
    a0, b0 = (root[:, None] * vh[:r]).to(t["lora_A"].dtype), (u[:, :r] * root).to(t["lora_B"].dtype)
    alpha = s * (math.sqrt(2 * r) if cfg.use_rslora else 2 * r)
    return {"lora_A": torch.cat([t["lora_A"], a0]), "lora_B": torch.cat([t["lora_B"], -b0], dim=1)}, 2 * r, alpha


def _peft_entries(cfg) -> dict:
    return {"use_rslora": cfg.use_rslora, "lora_dropout": cfg.dropout,
            "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True}


def _knobs(peft_cfg: dict) -> dict:
    # base-rewriting inits were refused before this runs: the tensors are a plain LoRA
    return {"alpha": float(peft_cfg["lora_alpha"]), "use_rslora": bool(peft_cfg.get("use_rslora", False)),
            "dropout": float(peft_cfg.get("lora_dropout") or 0.0),
            "init": "gaussian" if peft_cfg.get("init_lora_weights") == "gaussian" else "default"}


class LoRA:
    name = "lora"
    config_class = LoRAConfig
    layer_kinds = ("linear-like", "embedding", "torch-conv1d", "torch-conv2d")
    # y + delta(x): rows of a batch may use different attachments; not with OLoRA, whose init
    # rewrites the weight (a row without this adapter would see W_res, not W)
    def additive(cfg):
        return cfg.init != "olora"
    # PEFT's LoRA is this equation term for term: both directions are exact
    peft = ll.PeftFormat(
        {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}, {"use_dora": False},
        convert=_to_peft, config_of=_peft_entries, knobs_of=_knobs, importable=True,
    )

    def param_specs(d_in, d_out, cfg, target):
        kind = ll.kind_name(target.layer)
        if cfg.init == "olora":
            if kind in _CONV or kind == "embedding":
                raise ll.ConfigError(f"lora init='olora' supports linear layers only; {target.name} is {kind}.")
            if ll.is_quantized(target.layer):
                raise ll.WeightAccessError(
                    f"lora init='olora' rewrites the base weight of {target.name}, which is stored quantized; "
                    "use init='default' on quantized layers or dequantize the model first."
                )
            if cfg.r > min(d_in, d_out):
                raise ll.ConfigError(
                    f"lora init='olora' needs r <= min(d_in, d_out); r={cfg.r} but {target.name} is "
                    f"{d_in} -> {d_out}."
                )
            return {"lora_A": ll.ParamSpec((cfg.r, d_in), init="empty"),
                    "lora_B": ll.ParamSpec((d_out, cfg.r), init="empty")}
        a_init = _gaussian(cfg.r) if cfg.init == "gaussian" else "kaiming"
        if cfg.hotswap_rank:
            if kind in _CONV or kind == "embedding":
                raise ll.ConfigError(f"lora hotswap_rank supports linear layers only; {target.name} is {kind}.")
            big = cfg.hotswap_rank
            if cfg.init == "gaussian":
                a_init = lambda t, g=_gaussian(cfg.r): (t.zero_(), g(t[: cfg.r]))  # noqa: E731
            else:
                a_init = _padded_kaiming(cfg.r)
            return {
                "lora_A": ll.ParamSpec((big, d_in), init=a_init),
                "lora_B": ll.ParamSpec((d_out, big), init="zeros"),
                "lora_scale": ll.ParamSpec((1,), init=_scale(cfg), trainable=False, keep_fp32=True),
            }
        if kind in _CONV:
            layer, ones = target.layer, (1,) * len(target.layer.kernel_size)
            return {
                "lora_A": ll.ParamSpec((cfg.r, layer.in_channels, *layer.kernel_size), init=a_init),
                "lora_B": ll.ParamSpec((layer.out_channels, cfg.r, *ones), init="zeros"),
            }
        if kind == "embedding":
            return {"lora_A": ll.ParamSpec((cfg.r, d_in), init="zeros"), "lora_B": ll.ParamSpec((d_out, cfg.r), init="normal")}
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init=a_init),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    def init(layer, cfg):
        scale = _scale(cfg)
        layer.lora_scaling = scale
        kind = ll.kind_name(layer)
        if cfg.hotswap_rank:
            layer.lora_op = _padded_delta
            return
        # the hot path is chosen here, once: no dropout code runs when dropout == 0
        if kind in _CONV:
            layer.lora_conv = _CONV[kind]
            layer.lora_op = _conv_dropout_delta if cfg.dropout > 0 else _conv_delta
        elif kind == "embedding":
            layer.lora_op = _embedding_delta
        elif cfg.dropout > 0:
            layer.lora_op = _linear_dropout
        if cfg.dropout > 0:
            layer.lora_p = cfg.dropout
        if cfg.init == "olora":
            _olora(layer, cfg, scale)

    def forward(layer, x, y):
        d = layer.__dict__
        op = d.get("lora_op")
        if op is not None:
            return op(layer, x, y)
        # the factors straight from _parameters: nn.Module.__getattr__ costs ~0.6 us per tensor, a
        # tenth of a one-token call's adapter overhead (FSDP2 swaps its unsharded tensors in there too)
        p = d["_parameters"]
        return low_rank_update(x, p["lora_A"], p["lora_B"], d["lora_scaling"], y)

    def merge(layer, weight, bias):
        # W' = W + s B A on the (d_out, d_in) weight view (a conv's kernels flattened, an embedding's table^T);
        # with init="olora" W is already W_res. Dropout is off in a merged model (eval semantics).
        a, b = layer.lora_A.float(), layer.lora_B.float()
        s = float(layer.lora_scale) if layer.lora_cfg.hotswap_rank else layer.lora_scaling
        return torch.addmm(weight, b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), alpha=s), bias

    def hotswap(layer, cfg, saved_cfg, saved):
        # an adapter of any rank <= hotswap_rank and any alpha: its factors zero-padded, its scale
        if not cfg.hotswap_rank:
            raise ll.ConfigError(
                f"the attachment has r={cfg.r} and the file r={saved_cfg.r}; to hot-swap adapters of other ranks, "
                "attach with hotswap_rank=<the largest rank you will load> (PEFT's hotswap pads the same way)."
            )
        if saved_cfg.init == "olora" or saved_cfg.dropout:
            raise ll.ConfigError("an OLoRA or dropout adapter cannot be hot-swapped into a padded attachment.")
        a, b = saved["lora_A"], saved["lora_B"]
        k = a.shape[0]
        if a.dim() != 2 or a.shape[1] != layer.lora_A.shape[1] or b.shape != (layer.lora_B.shape[0], k):
            raise ll.ConfigError(f"the file's factors {tuple(a.shape)}, {tuple(b.shape)} do not fit this layer.")
        if k > cfg.hotswap_rank:
            raise ll.ConfigError(f"the file's adapter has rank {k} > hotswap_rank={cfg.hotswap_rank}.")
        big_a, big_b = torch.zeros_like(layer.lora_A), torch.zeros_like(layer.lora_B)
        big_a[:k], big_b[:, :k] = a, b
        scale = saved["lora_scale"] if "lora_scale" in saved else torch.tensor([_scale(saved_cfg)])
        return {"lora_A": big_a, "lora_B": big_b, "lora_scale": scale.reshape(1).to(layer.lora_scale)}

"""Layer kinds: the one place that knows how a target layer stores its weight.

Variants never touch ``layer.weight.data``. They call :func:`dense_weight` (a
``(d_out, d_in)`` tensor of real numbers, dequantized if the layer is quantized) and, if
they mutate the base, :func:`replace_dense_weight` (which keeps an exact undo so
``detach`` restores the original storage bit for bit). A layer whose storage no
registered kind understands raises :class:`WeightAccessError`: reading packed or integer
storage as if it were a weight is impossible by construction, because every kind matches
on the layer's class and storage type, and the plain kind only accepts a floating
``torch.nn.Parameter`` (not a subclass such as bnb's ``Params4bit``/``Int8Params``) of
shape ``(d_out, d_in)``.

Built-in kinds: ``linear`` (``nn.Linear`` and anything with a plain float weight and
``in_features``/``out_features``), ``conv1d`` (transformers' GPT-2 ``Conv1D``, weight
stored ``(d_in, d_out)``), ``bnb-4bit`` (bitsandbytes ``Linear4bit``, nf4/fp4, any quant
storage dtype, including bnb's CPU-packed inference layout) and ``bnb-8bit``
(``Linear8bitLt``: int8 codes times their per-row scales). bitsandbytes and transformers
are never imported here: a model can only contain their layers if they are already
imported, so the kinds look them up in ``sys.modules``.

New storage formats plug in with :func:`register_layer_kind` (a distribution that adds,
say, HQQ layers calls it when imported). This module imports nothing else of lora-lite
but its errors: it is the leaf every other module may read layers through.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import WeightAccessError

_UNDO_ATTR = "_lora_lite_weight_undo"
_ORIGINAL_ATTR = "_lora_lite_weight_original"
_FINGERPRINT_ATTR = "_lora_lite_weight_fingerprint"

Undo = Callable[[], None]


@dataclass(frozen=True)
class LayerKind:
    """How to read (and optionally write) the dense weight of one kind of layer.

    :param name: short label shown in errors and support tables.
    :param matches: ``layer -> bool``. Match on the layer's class and its weight's
        storage type, never on dtype alone (bnb can store 4-bit codes in float32).
    :param features: ``layer -> (d_in, d_out)``.
    :param read: ``layer -> Tensor (d_out, d_in)``, real numbers (dequantized if needed).
        Raise :class:`WeightAccessError` if the layer is in a state it cannot be read in.
    :param write: ``(layer, Tensor (d_out, d_in)) -> undo`` stores a new dense weight
        (requantizing if ``quantized``) and returns a no-argument function that puts the
        ORIGINAL storage back exactly; ``None`` when the kind cannot take a new weight.
    :param quantized: whether the storage is quantized (a write then loses precision).
    :param fingerprint: ``layer -> Tensor`` identifying the base weight for checkpoint
        checks, for storages that the owning library re-lays out in place (lossily);
        ``None`` uses ``read``.
    :param by_name_only: not linear-like (its input is not ``(..., d_in)``: embeddings take
        indices, convolutions channels-first maps): targeted only when ``target_names``
        names it, never by roles, and only by variants that list the kind in their
        ``layer_kinds``.
    :param sample: ``(layer, generator) -> a small valid input``, for attach's dry call of
        the variant's hooks; ``None``: ``randn(2, d_in)``.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], tuple[int, int]]
    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], Undo] | None = None
    quantized: bool = False
    fingerprint: Callable[[nn.Module], torch.Tensor] | None = None
    by_name_only: bool = False
    sample: Callable[[nn.Module, torch.Generator], torch.Tensor] | None = None


_HOST_ATTR = "_lora_lite_host"


def host_layer(layer: nn.Module) -> nn.Module:
    """The layer itself, or for an adapter slot (the holder of a second attachment stacked
    on one layer, see ``runtime.py``) the layer it sits on. Every function here reads and
    writes the host's storage and keeps its bookkeeping on the module it was given."""
    return layer.__dict__.get(_HOST_ATTR, layer)


def _swap_data(param: torch.Tensor, new: torch.Tensor) -> Undo:
    old = param.data
    param.data = new.to(dtype=old.dtype, device=old.device)
    return lambda: setattr(param, "data", old)


# -- plain floating weights --------------------------------------------------------------

def _plain_float(w: object, shape: tuple[int, int]) -> bool:
    return type(w) in (nn.Parameter, torch.Tensor) and w.is_floating_point() and tuple(w.shape) == shape


def _peek(layer: nn.Module, name: str) -> object:
    """``getattr(layer, name, None)`` without nn.Module's cost on a miss (building an
    AttributeError, ~1.6 us): targeting asks this of every module in the model."""
    d = layer.__dict__
    if name in d:
        return d[name]
    for store in ("_parameters", "_buffers", "_modules"):
        held = d.get(store)
        if held and name in held:
            return held[name]
    cls = type(layer)
    dynamic = _CLASS_ATTRS.get((cls, name))
    if dynamic is None:
        dynamic = _CLASS_ATTRS[(cls, name)] = hasattr(cls, name) or cls.__getattr__ is not nn.Module.__getattr__
    # a property, class attribute or custom __getattr__ may provide it
    return getattr(layer, name, None) if dynamic else None


_CLASS_ATTRS: dict[tuple[type, str], bool] = {}


def _is_plain_linear(layer: nn.Module) -> bool:
    d_in = _peek(layer, "in_features")
    if not isinstance(d_in, int):
        return False
    d_out = _peek(layer, "out_features")
    return isinstance(d_out, int) and _plain_float(_peek(layer, "weight"), (d_out, d_in))


def _in_out(layer: nn.Module) -> tuple[int, int]:
    return layer.in_features, layer.out_features


DENSE_LINEAR = LayerKind(
    name="linear",
    matches=_is_plain_linear,
    features=_in_out,
    read=lambda layer: layer.weight,
    write=lambda layer, w: _swap_data(layer.weight, w),
)


# -- transformers Conv1D (GPT-2): y = x @ W + b with W stored (d_in, d_out) --------------

def _is_conv1d(layer: nn.Module) -> bool:
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None)
    return (
        cls is not None and isinstance(layer, cls)
        and _plain_float(getattr(layer, "weight", None), (layer.nx, layer.nf))
    )


CONV1D = LayerKind(
    name="conv1d",
    matches=_is_conv1d,
    features=lambda layer: (layer.nx, layer.nf),
    read=lambda layer: layer.weight.T,
    write=lambda layer, w: _swap_data(layer.weight, w.T.contiguous()),
)


# -- layers that are linear in their weight but not linear-like: embeddings, convolutions --

def _swap_reshaped(param: torch.Tensor, new: torch.Tensor, to_storage: Callable[[torch.Tensor], torch.Tensor]) -> Undo:
    return _swap_data(param, to_storage(new).contiguous())


EMBEDDING = LayerKind(
    # y = W[:, x] for token ids x: a linear map of one-hot(x) with the (d_out, d_in) weight W^T
    name="embedding",
    matches=lambda layer: type(layer) is nn.Embedding and _plain_float(layer.weight, tuple(layer.weight.shape)),
    features=lambda layer: (layer.num_embeddings, layer.embedding_dim),
    read=lambda layer: layer.weight.T,
    write=lambda layer, w: _swap_reshaped(layer.weight, w, lambda t: t.T),
    by_name_only=True,
    sample=lambda layer, g: torch.randint(0, layer.num_embeddings, (2, 3), generator=g),
)


def _is_conv(layer: nn.Module, cls: type) -> bool:
    # groups and non-zero padding modes change what "the weight's linear map" means: not claimed
    return (type(layer) is cls and layer.groups == 1 and layer.padding_mode == "zeros"
            and _plain_float(layer.weight, tuple(layer.weight.shape)))


def _conv_sample(layer: nn.Module, g: torch.Generator) -> torch.Tensor:
    size = [max(8, d * (k - 1) + 1) for k, d in zip(layer.kernel_size, layer.dilation)]
    return torch.randn(1, layer.in_channels, *size, generator=g)


def _conv_kind(name: str, cls: type) -> LayerKind:
    # a convolution is linear in its input patches: (d_out, d_in) = (out, in * prod(kernel))
    return LayerKind(
        name=name, matches=lambda layer: _is_conv(layer, cls),
        features=lambda layer: (layer.weight[0].numel(), layer.out_channels),
        read=lambda layer: layer.weight.reshape(layer.out_channels, -1),
        write=lambda layer, w: _swap_reshaped(layer.weight, w, lambda t: t.reshape(layer.weight.shape)),
        by_name_only=True, sample=_conv_sample,
    )


TORCH_CONV1D = _conv_kind("torch-conv1d", nn.Conv1d)
TORCH_CONV2D = _conv_kind("torch-conv2d", nn.Conv2d)


# -- bitsandbytes ------------------------------------------------------------------------

def _bnb_class(name: str) -> type | None:
    return getattr(sys.modules.get("bitsandbytes.nn.modules"), name, None)


def _is_bnb(layer: nn.Module, layer_cls: str, param_cls: str) -> bool:
    cls = _bnb_class(layer_cls)  # the param class is looked up only for a layer of the bnb class
    return (cls is not None and isinstance(layer, cls)
            and isinstance(getattr(layer, "weight", None), _bnb_class(param_cls)))


def _bnb_error(layer: nn.Module, what: str) -> WeightAccessError:
    return WeightAccessError(
        f"{type(layer).__name__}({layer.in_features} -> {layer.out_features}) {what}. bitsandbytes quantizes a "
        "layer when it is moved to a device (layer.to('cpu'), .cuda()) or loaded with a BitsAndBytesConfig; "
        "quantize the model before attaching."
    )


@dataclass(frozen=True)
class _FourBit:
    """A 4-bit layer's codes and block scales in bnb's canonical layout."""

    codes: torch.Tensor  # packed nibbles, (n, 1) in the quant storage dtype
    absmax: torch.Tensor  # float32 scale per block, nested statistics already expanded
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    nested: bool


def _four_bit(layer: nn.Module) -> _FourBit:
    w = layer.weight
    state = getattr(w, "quant_state", None) or getattr(layer, "quant_state", None)
    if not getattr(w, "bnb_quantized", False) or state is None:
        raise _bnb_error(layer, "is not quantized yet (no quant_state): its storage holds unquantized values")
    import bitsandbytes.functional as bnbf

    if getattr(state, "packing_format_for_cpu", False):
        # bnb repacked the codes in place for AVX512-BF16 CPU inference and keeps the
        # scales it computes with as bf16 (N, K / blocksize).T; undo the layout on copies
        codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(w.data.clone(), copy.deepcopy(state))
        return _FourBit(
            codes, state.absmax.T.reshape(-1).float(), state.shape, state.original_dtype,
            state.blocksize, state.quant_type, state.original_nested,
        )
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _FourBit(w.data, absmax.float(), state.shape, state.dtype, state.blocksize, state.quant_type, state.nested)


def _dequantize(q: _FourBit, absmax: torch.Tensor) -> torch.Tensor:
    from bitsandbytes.functional import QuantState, dequantize_4bit

    state = QuantState(absmax=absmax, shape=q.shape, blocksize=q.blocksize, quant_type=q.quant_type, dtype=q.dtype)
    return dequantize_4bit(q.codes, state)


def _read_4bit(layer: nn.Module) -> torch.Tensor:
    q = _four_bit(layer)
    return _dequantize(q, q.absmax)


def _fingerprint_4bit(layer: nn.Module) -> torch.Tensor:
    # bnb's CPU repacking rounds the block scales to bf16; round them always, so the
    # same weights have the same fingerprint whether or not inference has repacked them
    q = _four_bit(layer)
    return _dequantize(q, q.absmax.to(torch.bfloat16).float())


def _write_4bit(layer: nn.Module, new: torch.Tensor) -> Undo:
    from bitsandbytes.functional import quantize_4bit

    w, q = layer.weight, _four_bit(layer)
    old = (w.data, w.quant_state, getattr(layer, "quant_state", None))
    codes, state = quantize_4bit(
        new.detach().to(device=q.codes.device, dtype=q.dtype).contiguous(),
        blocksize=q.blocksize, compress_statistics=q.nested, quant_type=q.quant_type, quant_storage=q.codes.dtype,
    )
    w.data, w.quant_state, layer.quant_state = codes, state, state

    def undo() -> None:
        w.data, w.quant_state, layer.quant_state = old

    return undo


def _bnb_kind(name: str, layer_cls: str, param_cls: str, read, write, fingerprint=None) -> LayerKind:
    return LayerKind(
        name=name, matches=lambda layer: _is_bnb(layer, layer_cls, param_cls),
        features=_in_out, read=read, write=write, quantized=True, fingerprint=fingerprint,
    )


BNB_4BIT = _bnb_kind("bnb-4bit", "Linear4bit", "Params4bit", _read_4bit, _write_4bit, _fingerprint_4bit)


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    # before the first forward bnb keeps the scales on the weight, afterwards on layer.state
    w = layer.weight
    scales = getattr(w, "SCB", None)
    if scales is None:
        scales = getattr(layer.state, "SCB", None)
    if scales is None:
        raise _bnb_error(layer, "holds int8 codes without their scales (SCB)")
    return scales


def _read_8bit(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    if layer.state.has_fp16_weights and w.is_floating_point():
        return w.as_subclass(torch.Tensor)  # the fp master weight; bnb quantizes it on the fly in forward
    if w.dtype != torch.int8:
        raise _bnb_error(layer, f"is not quantized yet (weight dtype {w.dtype}, has_fp16_weights=False)")
    from bitsandbytes.functional import int8_vectorwise_dequant

    return int8_vectorwise_dequant(w.data, _int8_scales(layer))


def _write_8bit(layer: nn.Module, new: torch.Tensor) -> Undo:
    w, state = layer.weight, layer.state
    old = (w.data, w.CB, w.SCB, state.CB, state.SCB)

    def undo() -> None:
        w.data, w.CB, w.SCB, state.CB, state.SCB = old

    if state.has_fp16_weights and w.is_floating_point():
        w.data = new.detach().to(dtype=w.dtype, device=w.device)
        state.CB = state.SCB = None  # bnb caches the on-the-fly quantization in eval mode
        return undo
    _int8_scales(layer)
    from bitsandbytes.functional import int8_vectorwise_quant

    codes, scales, _ = int8_vectorwise_quant(new.detach().to(device=w.device, dtype=torch.float16).contiguous())
    w.data = codes
    if state.CB is not None:  # after the first forward bnb reads codes and scales from state
        state.CB, state.SCB = codes, scales
    else:
        w.CB, w.SCB = codes, scales
    return undo


BNB_8BIT = _bnb_kind("bnb-8bit", "Linear8bitLt", "Int8Params", _read_8bit, _write_8bit)


# -- registry ----------------------------------------------------------------------------

BUILTIN_KINDS = (BNB_4BIT, BNB_8BIT, CONV1D, DENSE_LINEAR, EMBEDDING, TORCH_CONV1D, TORCH_CONV2D)
LINEAR_LIKE = "linear-like"  # in a variant's layer_kinds: every kind that is not by_name_only
_KINDS: list[LayerKind] = list(BUILTIN_KINDS)


def register_layer_kind(kind: LayerKind, *, first: bool = True) -> None:
    """Teach lora-lite a new layer storage. With ``first`` (default) it is tried before
    every kind registered so far, so it can claim layers a built-in kind would match."""
    if not isinstance(kind, LayerKind):
        raise WeightAccessError(f"register_layer_kind expects a lora_lite.LayerKind, got {type(kind).__name__}.")
    if any(k.name == kind.name for k in _KINDS):
        raise WeightAccessError(
            f"a layer kind named {kind.name!r} is already registered; pick another name or "
            "unregister_layer_kind() it first."
        )
    _KINDS.insert(0 if first else len(_KINDS), kind)


def unregister_layer_kind(name: str) -> None:
    """Forget the layer kind called ``name`` (built-in ones included)."""
    for i, kind in enumerate(_KINDS):
        if kind.name == name:
            del _KINDS[i]
            return
    raise WeightAccessError(f"no layer kind named {name!r} is registered; registered: {[k.name for k in _KINDS]}.")


def layer_kinds() -> tuple[LayerKind, ...]:
    """Every registered kind, in the order they are tried."""
    return tuple(_KINDS)


def layer_kind(layer: nn.Module) -> LayerKind | None:
    """The registered kind of ``layer``, or ``None``."""
    layer = host_layer(layer)
    for kind in _KINDS:
        if kind.matches(layer):
            return kind
    return None


def kind_name(layer: nn.Module) -> str:
    """The name of the layer's registered kind (``"linear"``, ``"bnb-4bit"``, ...), or
    ``"unknown"`` for a linear-like layer no registered kind understands."""
    kind = layer_kind(layer)
    return kind.name if kind is not None else "unknown"


def is_linear_like(layer: nn.Module) -> bool:
    """Structural test: a registered kind, or ``in_features``/``out_features``/``weight``.
    Adapter slots are never linear-like (they only borrow their host's attributes)."""
    if _HOST_ATTR in layer.__dict__:
        return False
    kind = layer_kind(layer)
    if kind is not None:
        return not kind.by_name_only
    return looks_linear(layer)


def looks_linear(layer: nn.Module) -> bool:
    """The structural half of :func:`is_linear_like`: integer ``in_features`` and
    ``out_features`` and a ``weight``."""
    return (
        isinstance(_peek(layer, "in_features"), int)
        and isinstance(_peek(layer, "out_features"), int)
        and _peek(layer, "weight") is not None
    )


def features(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear-like layer."""
    layer = host_layer(layer)
    kind = layer_kind(layer)
    if kind is not None:
        return kind.features(layer)
    if is_linear_like(layer):
        return layer.in_features, layer.out_features
    raise WeightAccessError(f"{type(layer).__name__} is not linear-like (no in_features/out_features/weight).")


def _kind_or_raise(layer: nn.Module) -> LayerKind:
    kind = layer_kind(layer)
    if kind is None:
        w = getattr(layer, "weight", None)
        raise WeightAccessError(
            f"cannot read the dense weight of {type(layer).__module__}.{type(layer).__name__} "
            f"(weight type {type(w).__name__}, dtype {getattr(w, 'dtype', None)}): no registered layer "
            "kind understands its storage, and reading quantized or packed storage as a weight would give "
            "garbage. Use a variant that does not read weights (e.g. lora), or register a LayerKind with "
            "lora_lite.register_layer_kind()."
        )
    return kind


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as real numbers, shape ``(d_out, d_in)``. Do not mutate it."""
    return _kind_or_raise(layer).read(host_layer(layer))


def weight_fingerprint_tensor(layer: nn.Module) -> torch.Tensor:
    """The tensor a checkpoint's base-weight fingerprint is computed from (see ``LayerKind.fingerprint``)."""
    kind = _kind_or_raise(layer)
    return (kind.fingerprint or kind.read)(host_layer(layer))


def base_fingerprint(layer: nn.Module) -> list[float]:
    """Identity of the layer's base weight for checkpoints: float64 ``[sum, sum of squares]``.

    Taken from the weight as it was before the first :func:`replace_dense_weight` (the
    original it keeps, or the fingerprint it took), else from the current weight, so
    attach never pays for it: ``save`` and ``load`` compute it when they need it. On a sharded (DTensor) weight the reductions
    are partial per rank and ``full_tensor`` sums the two scalars across ranks (a
    collective, like the rest of a sharded save).
    """
    saved = layer.__dict__.get(_FINGERPRINT_ATTR)
    if saved is not None:
        return list(saved)
    w = layer.__dict__.get(_ORIGINAL_ATTR)  # a rewritten weight: the one it replaced
    if w is None:
        try:
            w = weight_fingerprint_tensor(layer)
        except WeightAccessError:
            w = host_layer(layer).weight
    with torch.no_grad():
        w64 = w.detach().to(torch.float64)
        if callable(getattr(w64, "full_tensor", None)):
            return [float(w64.sum().full_tensor()), float((w64 * w64).sum().full_tensor())]
        w64 = w64.reshape(-1)
        # dot, not (w64 * w64).sum(): no second weight-sized temporary
        return [float(w64.sum()), float(torch.dot(w64, w64))]


def is_quantized(layer: nn.Module) -> bool:
    """Whether the layer's storage is quantized (or unknown, which counts as quantized)."""
    kind = layer_kind(layer)
    return kind is None or kind.quantized


def replace_dense_weight(layer: nn.Module, new_weight: torch.Tensor, *, requantize: bool = False) -> None:
    """Overwrite the layer's weight with ``new_weight`` (``(d_out, d_in)``).

    The first call per attach keeps the kind's undo, so ``detach`` (and a rolled-back
    attach) restores the original storage bit for bit. A quantized layer is only
    rewritten with ``requantize=True``: the stored weight is then the requantized
    ``new_weight``, which differs from it by the quantization error.
    """
    kind = _kind_or_raise(layer)
    if kind.write is None:
        raise WeightAccessError(
            f"{kind.name} layers cannot take a new dense weight. Dequantize the model first, or use a "
            "variant that does not rewrite the base weight."
        )
    if kind.quantized and not requantize:
        raise WeightAccessError(
            f"{type(layer).__name__} ({kind.name}) stores its weight quantized: writing a new weight means "
            "requantizing it, which loses precision. Pass requantize=True if that is what the variant wants."
        )
    host = host_layer(layer)
    expected = kind.features(host)[::-1]
    if tuple(new_weight.shape) != expected:
        raise WeightAccessError(f"new weight has shape {tuple(new_weight.shape)}, the layer needs {expected}.")
    first = _UNDO_ATTR not in layer.__dict__
    # a kind with its own fingerprint (bnb 4-bit) sees more than the dense original keeps:
    # take it now; any other is fingerprinted later from the original it keeps anyway
    fingerprint = base_fingerprint(layer) if first and kind.fingerprint is not None else None
    # the original dense weight, for export: a view that keeps the old storage alive (no
    # copy for plain kinds, whose write swaps in a new tensor), a dequantized copy otherwise
    original = kind.read(host).detach() if first else None
    undo = kind.write(host, new_weight)
    if not callable(undo):
        raise WeightAccessError(f"layer kind {kind.name!r}: write must return an undo function, got {undo!r}.")
    if first:
        layer.__dict__[_UNDO_ATTR] = undo
        layer.__dict__[_ORIGINAL_ATTR] = original
        if fingerprint is not None:
            layer.__dict__[_FINGERPRINT_ATTR] = fingerprint


def original_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight ``(d_out, d_in)`` from before :func:`replace_dense_weight` (the
    current one if it was never replaced)."""
    original = layer.__dict__.get(_ORIGINAL_ATTR)
    return dense_weight(layer) if original is None else original


def restore_dense_weight(layer: nn.Module) -> None:
    """Undo :func:`replace_dense_weight` exactly (no-op if the weight was never replaced)."""
    layer.__dict__.pop(_ORIGINAL_ATTR, None)
    layer.__dict__.pop(_FINGERPRINT_ATTR, None)
    undo = layer.__dict__.pop(_UNDO_ATTR, None)
    if undo is not None:
        undo()

"""Layer kinds: the one place that knows how a target layer stores its weight.

Variants never touch ``layer.weight.data``. They call :func:`dense_weight` (a
``(d_out, d_in)`` tensor of real numbers) and, if they mutate the base,
:func:`replace_dense_weight` (which records the original so ``detach`` restores it
exactly). A layer whose storage no registered kind understands raises
:class:`WeightAccessError`: reading packed or integer storage as if it were a weight is
impossible by construction, because the plain kind only accepts a floating
``torch.nn.Parameter`` of shape ``(d_out, d_in)`` and nothing subclassing it.

New storage formats plug in with :func:`register_layer_kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import WeightAccessError

_BACKUP_ATTR = "_lora_lite_weight_backup"


@dataclass(frozen=True)
class LayerKind:
    """How to read (and optionally write) the dense weight of one kind of layer.

    :param name: short label shown in errors and support tables.
    :param matches: ``layer -> bool``.
    :param features: ``layer -> (d_in, d_out)``.
    :param read: ``layer -> Tensor (d_out, d_in)``, real numbers (dequantized if needed).
    :param write: ``(layer, Tensor (d_out, d_in)) -> None`` or ``None`` when the kind
        cannot take a new dense weight (quantized storage without requantization).
    :param quantized: whether the storage is quantized.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], tuple[int, int]]
    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], None] | None = None
    quantized: bool = False


def _is_plain_float_weight(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (
        type(w) in (nn.Parameter, torch.Tensor)
        and w.is_floating_point()
        and w.dim() == 2
        and isinstance(getattr(layer, "in_features", None), int)
        and isinstance(getattr(layer, "out_features", None), int)
        and tuple(w.shape) == (layer.out_features, layer.in_features)
    )


def _write_plain(layer: nn.Module, w: torch.Tensor) -> None:
    layer.weight.data = w.to(dtype=layer.weight.dtype, device=layer.weight.device)


DENSE_LINEAR = LayerKind(
    name="linear",
    matches=_is_plain_float_weight,
    features=lambda layer: (layer.in_features, layer.out_features),
    read=lambda layer: layer.weight,
    write=_write_plain,
)

_KINDS: list[LayerKind] = [DENSE_LINEAR]


def register_layer_kind(kind: LayerKind, *, first: bool = True) -> None:
    """Teach lora-lite a new layer storage. Kinds registered later are tried first."""
    if any(k.name == kind.name for k in _KINDS):
        raise WeightAccessError(f"a layer kind named {kind.name!r} is already registered.")
    _KINDS.insert(0 if first else len(_KINDS), kind)


def layer_kinds() -> tuple[LayerKind, ...]:
    return tuple(_KINDS)


def layer_kind(layer: nn.Module) -> LayerKind | None:
    """The registered kind of ``layer``, or ``None``."""
    for kind in _KINDS:
        if kind.matches(layer):
            return kind
    return None


def is_linear_like(layer: nn.Module) -> bool:
    """Structural test: a registered kind, or ``in_features``/``out_features``/``weight``."""
    if layer_kind(layer) is not None:
        return True
    return (
        isinstance(getattr(layer, "in_features", None), int)
        and isinstance(getattr(layer, "out_features", None), int)
        and getattr(layer, "weight", None) is not None
    )


def features(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear-like layer."""
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
    return _kind_or_raise(layer).read(layer)


def is_quantized(layer: nn.Module) -> bool:
    kind = layer_kind(layer)
    return kind is None or kind.quantized


def replace_dense_weight(layer: nn.Module, new_weight: torch.Tensor) -> None:
    """Overwrite the layer's weight with ``new_weight`` (``(d_out, d_in)``).

    The first call per attach keeps the original storage tensor so that ``detach``
    (and a rolled-back attach) restores it bit for bit.
    """
    kind = _kind_or_raise(layer)
    if kind.write is None:
        raise WeightAccessError(
            f"{kind.name} layers store quantized weights and cannot take a new dense weight. "
            "Dequantize the model first, or use a variant that does not rewrite the base weight."
        )
    if _BACKUP_ATTR not in layer.__dict__:
        layer.__dict__[_BACKUP_ATTR] = layer.weight.data
    kind.write(layer, new_weight)


def original_weight(layer: nn.Module) -> torch.Tensor:
    """The weight storage from before :func:`replace_dense_weight` (the current one if never replaced)."""
    return layer.__dict__.get(_BACKUP_ATTR, layer.weight)


def restore_dense_weight(layer: nn.Module) -> None:
    """Undo :func:`replace_dense_weight` exactly (no-op if the weight was never replaced)."""
    backup = layer.__dict__.pop(_BACKUP_ATTR, None)
    if backup is not None:
        layer.weight.data = backup


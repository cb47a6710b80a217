"""Configs: the shared base dataclass, per-variant typed knobs, (de)serialisation.

``LoraLiteConfig(variant="delora", r=8, lambda0=15.0)`` returns an instance of the
variant's own ``config_class`` (a dataclass subclass adding typed knobs), so user code
keeps the one entry point while every knob is a real, validated field. Unknown knobs
raise :class:`ConfigError` listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import ConfigError

ROLES = ("reader", "writer", "inner")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_config_class(variant: str) -> type[LoraLiteConfig]:
    """The config class of ``variant``; :mod:`lora_lite.plugins` (the registry) installs the
    real lookup when it is imported, so this module needs no import of it."""
    raise ConfigError(f"no variant registry is loaded to resolve variant {variant!r}; import lora_lite first.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class LoraLiteConfig:
    """Base config shared by every variant.

    :param variant: name of the variant plugin (``lora``, ``pissa``, ...).
    :param r: adapter rank.
    :param alpha: scale numerator; additive variants scale by ``alpha / r``.
    :param dtype: storage dtype of the adapter tensors. The forward computes in the
        input's dtype by casting the (small) adapter tensors, never the activations.
        Tensors a variant marks ``keep_fp32`` (gates and scales near 1.0) stay fp32.
    :param target_roles: subset of ``("reader", "writer", "inner")``; ``()`` = all.
    :param target_names: regexes (``re.search`` on the module path); if non-empty, a
        target must match at least one.
    :param exclude_names: regexes; a module matching any is never a target.
    :param layers: transformer block indices to target (``.layers.N.``, ``.h.N.``,
        ``.layer.N.``, ``.block.N.``, ``.blocks.N.``), or ``None`` for all.
    """

    variant: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dtype: torch.dtype = torch.float32
    target_roles: tuple[str, ...] = ()
    target_names: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ("lm_head", "embed_tokens")
    layers: tuple[int, ...] | None = None

    # smallest valid r; a variant whose r may be 0 (meaning "derived from another knob",
    # as OFT's r next to oft_block_size) lowers it in its config class
    r_min: ClassVar[int] = 1

    # fields every variant shares; knobs are the fields a subclass adds
    _BASE_FIELDS: ClassVar[tuple[str, ...]] = (
        "variant", "r", "alpha", "dtype", "target_roles", "target_names", "exclude_names", "layers",
    )

    def __new__(cls, *args: Any, **kwargs: Any):
        if not args and not kwargs:  # copy/pickle protocol, or all defaults
            return object.__new__(cls)
        if cls is LoraLiteConfig:
            if args:
                raise ConfigError(
                    "LoraLiteConfig takes keyword arguments only, e.g. "
                    "LoraLiteConfig(variant='lora', r=8, alpha=16)."
                )
            variant = kwargs.get("variant", "lora")
            if not isinstance(variant, str):
                raise ConfigError(f"variant must be a string, got {type(variant).__name__}.")
            cls = resolve_config_class(variant)
        _check_known_fields(cls, kwargs)
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if type(self) is LoraLiteConfig:  # LoraLiteConfig() with no arguments: __new__ could not tell it from copy
            cls = resolve_config_class(self.variant)
            if cls is not LoraLiteConfig:
                self.__class__ = cls
                for f in dataclasses.fields(cls):
                    if not hasattr(self, f.name):
                        setattr(self, f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        self._coerce_sequences()
        _check_types(self)
        if self.r < self.r_min:
            kind = "a positive integer" if self.r_min == 1 else f"an integer >= {self.r_min}"
            raise ConfigError(f"r must be {kind}, got {self.r}.")
        if self.alpha == 0:
            raise ConfigError("alpha must be non-zero: alpha=0 makes the adapter a no-op that never trains.")
        if not self.dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating dtype (e.g. torch.float32), got {self.dtype}.")
        bad = [role for role in self.target_roles if role not in ROLES]
        if bad:
            raise ConfigError(f"target_roles {bad} unknown; valid roles are {ROLES}.")
        for pattern in (*self.target_names, *self.exclude_names):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"invalid regex {pattern!r} in target_names/exclude_names: {err}.") from None
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"layers must be non-negative block indices, got {self.layers}.")
        self.validate()

    def validate(self) -> None:
        """Variant configs override this to range-check their knobs (raise ConfigError)."""

    def _coerce_sequences(self) -> None:
        for name in ("target_roles", "target_names", "exclude_names"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if isinstance(value, list):
                value = tuple(value)
            setattr(self, name, value)
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = (self.layers,)
        elif isinstance(self.layers, (list, range)):
            self.layers = tuple(self.layers)
        if isinstance(self.dtype, str):
            if self.dtype.removeprefix("torch.") not in _DTYPES:
                raise ConfigError(f"dtype {self.dtype!r} unknown; use one of {sorted(_DTYPES)}.")
            self.dtype = _DTYPES[self.dtype.removeprefix("torch.")]

    @classmethod
    def knobs(cls) -> tuple[str, ...]:
        """The variant-specific fields of this config class."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls._BASE_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: dtype as its name, tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = _dtype_name(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> LoraLiteConfig:
        """Inverse of :meth:`to_dict`; resolves the variant's config class."""
        return LoraLiteConfig(**data)


def _check_known_fields(cls: type, kwargs: dict[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        knobs = [n for n in names if n not in LoraLiteConfig._BASE_FIELDS]
        variant = kwargs.get("variant", getattr(cls, "variant", "?"))
        raise ConfigError(
            f"unknown config field(s) {unknown} for variant {variant!r}. "
            f"Shared fields: {list(LoraLiteConfig._BASE_FIELDS)}; "
            f"this variant's knobs: {knobs or 'none'}."
        )


def _check_types(cfg: LoraLiteConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(
                f"config field {f.name!r} must be {_type_name(hints[f.name])}, "
                f"got {value!r} ({type(value).__name__})."
            )


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    # Literal/Union/tuple[...] carry a bare __name__ ("Literal"); their str names the allowed values
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


__all__ = ["LoraLiteConfig", "ROLES", "field"]

"""ParamSpec: how a variant declares one adapter tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from .errors import PluginError

Init = Union[str, float, int, Callable[[torch.Tensor], None]]

_NAMED_INITS = ("zeros", "ones", "kaiming", "normal", "empty")


_KAIMING_GAIN = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))


def _kaiming_bound(shape: tuple[int, ...]) -> float:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))``'s bound, with its arithmetic (so the same
    seed draws bit-identical values) but without its per-call checks: it was a fifth of
    attach's time."""
    fan_in = shape[1] * math.prod(shape[2:])
    if fan_in == 0:
        return 0.0
    return math.sqrt(3.0) * (_KAIMING_GAIN / math.sqrt(fan_in))


@dataclass(frozen=True)
class ParamSpec:
    """One adapter tensor.

    :param shape: tensor shape.
    :param init: ``"zeros"``, ``"ones"``, ``"kaiming"`` (``kaiming_uniform_(a=sqrt(5))``,
        as ``nn.Linear`` and PEFT initialise ``lora_A``), ``"normal"`` (std 1), a number
        (constant fill), ``"empty"`` (left unset: an ``init`` hook fills it), or a callable
        ``fn(tensor) -> None`` that fills the freshly allocated tensor in place under
        ``no_grad`` (already in its storage dtype and on the layer's device; draw from
        torch's global RNG, which ``attach`` callers seed). ``init`` hooks may overwrite it.
    :param trainable: whether the optimizer should see it (``requires_grad``).
    :param keep_fp32: store in float32 whatever ``cfg.dtype`` says. Use it for gates and
        scales that start near 1.0, where bf16's spacing (2^-7) would swallow small
        optimizer updates and freeze the tensor.
    :param persistent: saved in checkpoints. ``False`` only for tensors the variant
        regenerates identically at attach (e.g. from a seed in its config).
    """

    shape: tuple[int, ...]
    init: Init = "zeros"
    trainable: bool = True
    keep_fp32: bool = False
    persistent: bool = True

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise PluginError(f"ParamSpec shape must be non-negative ints, got {self.shape!r}.")
        object.__setattr__(self, "shape", shape)
        if isinstance(self.init, str) and self.init not in _NAMED_INITS:
            raise PluginError(f"ParamSpec init {self.init!r} unknown; use one of {_NAMED_INITS}, a number or a callable.")
        if isinstance(self.init, str) and self.init == "kaiming" and len(shape) < 2:
            raise PluginError(
                f"ParamSpec init 'kaiming' needs a tensor of at least 2 dimensions (its fan-in is shape[1]), "
                f"got shape {shape}; use 'normal', a number or a callable for vectors."
            )

    def materialize(self, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        dtype = torch.float32 if self.keep_fp32 else dtype
        init = self.init
        if isinstance(init, str) and init == "zeros":
            return nn.Parameter(torch.zeros(self.shape, dtype=dtype, device=device), requires_grad=self.trainable)
        data = torch.empty(self.shape, dtype=dtype, device=device)
        with torch.no_grad():
            if init == "ones":
                data.fill_(1.0)
            elif init == "kaiming":
                bound = _kaiming_bound(self.shape)
                data.uniform_(-bound, bound)
            elif init == "normal":
                data.normal_()
            elif init == "empty":
                pass
            elif isinstance(init, (int, float)):
                data.fill_(float(init))
            else:
                init(data)
        return nn.Parameter(data, requires_grad=self.trainable)

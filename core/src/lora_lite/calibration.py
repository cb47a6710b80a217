"""One calibration pass for data-calibrated variants (``group_init``): the loop EVA, CorDA,
LoRA-GA and AntiPaSTO share.

    handles = [(t.host, capture(t.name)) for t in targets]
    ll.run_calibration(model, calibration_data, variant="eva", why="...", pre_hooks=handles)

It normalises the data (one batch, a tensor or a dict of model inputs, or an iterable of
batches), registers the hooks on the modules the model really calls (``target.host``),
runs every batch in calibration mode and always cleans up: hooks removed, every module's own
train/eval mode restored. Calibration mode is eval (or train with ``train=True``), except
that quantized layers keep their mode: bitsandbytes re-lays out (and rounds) 4-bit storage
on CPU when a layer switches mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError
from .weights import layer_kind

Hook = Callable[..., Any]


def run_model_on(model: nn.Module, batch: Any) -> Any:
    """The default calibration forward: ``model(**batch)`` for a dict of inputs, ``model(batch)``
    for a tensor, ``model(*batch)`` for a tuple or list, moved to the model's device."""
    device = next(model.parameters()).device
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(batch, Mapping):
        return model(**{k: move(v) for k, v in batch.items()})
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    if isinstance(batch, (list, tuple)):
        return model(*[move(v) for v in batch])
    raise CalibrationError(
        f"a calibration batch is a {type(batch).__name__}; pass tensors, dicts of model inputs or tuples."
    )


def run_calibration(
    model: nn.Module,
    calibration_data: Any,
    *,
    variant: str,
    why: str = "calibrates on data",
    run: Callable[[nn.Module, Any], Any] = run_model_on,
    pre_hooks: Iterable[tuple[nn.Module, Hook]] = (),
    forward_hooks: Iterable[tuple[nn.Module, Hook]] = (),
    train: bool = False,
    grad: bool = False,
) -> int:
    """Run ``run(model, batch)`` over ``calibration_data`` with the given hooks registered;
    returns the number of batches. ``grad=True`` runs under ``enable_grad`` (``run`` may call
    ``backward``: ``group_init`` restores ``requires_grad`` and ``.grad`` afterwards).

    :raises CalibrationError: no data (the message says what ``variant`` needs it for:
        ``why``), or an iterable that yields no batch.
    """
    if calibration_data is None:
        raise CalibrationError(
            f"{variant} {why} and needs data: call lora_lite.attach(model, cfg, calibration_data=batches) with a "
            "few batches of model inputs."
        )
    if isinstance(calibration_data, (torch.Tensor, Mapping)):
        calibration_data = [calibration_data]
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(h) for m, h in pre_hooks]
    handles += [m.register_forward_hook(h) for m, h in forward_hooks]
    seen = 0
    try:
        model.train(train)
        for module, mode in modes:
            kind = layer_kind(module)
            if kind is not None and kind.quantized:
                module.training = mode
        with torch.enable_grad() if grad else torch.no_grad():
            for batch in calibration_data:
                run(model, batch)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes:
            module.training = mode
    if not seen:
        raise CalibrationError(f"{variant}: calibration_data yielded no batches; pass at least one batch.")
    return seen


__all__ = ["run_calibration", "run_model_on"]

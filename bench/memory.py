"""Peak bytes of live tensor storage during a callable, on any device (CPU included).

A dispatch mode sees every tensor an op returns; each distinct storage is counted until
its Python storage object dies (torch keeps that object alive as long as the storage).
Tensors that exist before the call (parameters, gradients, optimizer state, inputs) are
counted from the start via ``preexisting``.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _PeakMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._refs: list[weakref.ref] = []

    def track(self, t: torch.Tensor) -> None:
        if t.layout != torch.strided:  # sparse (PEFT's SHiRA): count its dense parts, which own storages
            if t.is_sparse:
                self.track(t._indices())
                self.track(t._values())
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        self._refs.append(weakref.ref(st, lambda _, key=key: self._free(key)))

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.track(t)
        return out


def peak_bytes(fn: Callable[[], object], preexisting: Iterable[torch.Tensor]) -> int:
    """Peak live storage bytes while ``fn()`` runs, counting ``preexisting`` from the start."""
    mode = _PeakMemory()
    for t in preexisting:
        mode.track(t)
    with mode:
        fn()
    return mode.peak

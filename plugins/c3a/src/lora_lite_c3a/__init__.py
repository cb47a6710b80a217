"""C3A: circular convolution adaptation (Chen et al. 2024, https://arxiv.org/abs/2407.19342).

Paper: A. Chen, J. Cheng, Z. Liu, Z. Gao, F. Tsung, Y. Li, J. Li, "Parameter-Efficient
Fine-Tuning via Circular Convolution" (ACL 2025).

With block size ``b`` dividing ``d_in`` and ``d_out``, the update is a block matrix of
``(d_out / b) x (d_in / b)`` circulant ``b x b`` blocks, each one the circular convolution with a
trainable kernel ``w[i, j]: (b,)``, scaled by ``1 / d_in`` as PEFT::

    y' = y + (1 / d_in) C(w) x,     C(w)[i b + t, j b + s] = w[i, j, (s - t) mod b]
    lora_kernel: (d_out / b, d_in / b, b)

which is what PEFT's ``BlockCircularConvolution`` (``fft(ifft(x) * fft(w)).real`` per block)
computes. ``r`` and ``alpha`` are unused; the trainable count is ``d_in d_out / b``.

Dense or FFT, by measurement: the hook materialises ``C(w)`` (one gather of the kernel,
weight-sized) and runs one GEMM, instead of PEFT's FFT form. Forward + backward, fp32, CPU, one
thread (torch 2.13): d=512, b=64, 512 tokens: dense 16.5 ms, FFT 25.6 ms; d=1024, b=256, 1024
tokens: 103 vs 143 ms; d=1024, b=32: 99 vs 120 ms; d=2048, b=256, 512 tokens: dense 220 vs FFT
133 ms. Dense wins once a call has about as many tokens as the layer is wide (training
batches), FFT on short calls over wide layers (decoding). Dense also keeps the activations in
their own dtype (``torch.fft`` has no bf16 on CPU; PEFT casts the activations to fp32) and
shares its code with ``merge``. Not measured on GPU. With the dense form the layer is best run
as ONE matmul on ``W + C(w) / d_in`` (``merged_forward``: core does so on ``nn.Linear`` and
``Conv1D``; the ``forward`` hook, a second matmul after the base's, serves quantized layers,
stacked attachments and mixed batches). The price of the dense form is memory: the
weight-sized ``W'`` is saved for backward, where PEFT's FFT saves ``x`` and the kernel (bench,
small shape, all linears: peak training memory 1.29x PEFT's, 1.04x on q/v).

Identity at init: the kernel is zeros (PEFT's ``init_weights=True``; PEFT's *default* is
``"xavier_uniform"``, which is not the identity), so the update is exactly zero; the update
is linear in the kernel, so the kernel gets a gradient at once. The kernel
is stored in fp32 whatever ``cfg.dtype``, as PEFT does.

Block size: ``block_size`` (PEFT's default 256) must divide both widths for PEFT, which refuses
other layers. Here a layer it does not divide gets ``gcd(block_size, d_in, d_out)`` instead,
with a ``UserWarning`` saying so (a layer whose gcd is 1 gets a dense ``d_out x d_in`` kernel).

Layers: any linear-like layer, quantized ones included: the weight is never read.

PEFT format (``ll.export_peft`` / ``ll.import_peft``): PEFT's ``C3A`` adapter, the kernel as
``c3a_kernel`` (same ``(d_out/b, d_in/b, b)`` layout, copied bit for bit), ``block_size`` as
``block_size``. Export refuses an attachment where some layer fell back to a smaller block
(the gcd rule above: PEFT refuses that layer); import refuses ``block_size_pattern``, ``bias``
other than ``"none"`` and anything else it does not model. ``init_weights`` is accepted whatever
its value (the file holds the trained kernels).

Not implemented: PEFT's non-zero inits (``init_weights="xavier_uniform"`` (its default),
``"gaussian"``, ``"kaiming_uniform"``: none is the identity at init), ``block_size_pattern`` (per-layer block sizes
by name) and ``bias`` training.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class C3AConfig(ll.LoraLiteConfig):
    variant: str = "c3a"
    block_size: int = 256

    def validate(self):
        if self.block_size < 1:
            raise ll.ConfigError(f"c3a block_size must be a positive integer, got {self.block_size}.")


def block_for(d_in: int, d_out: int, block_size: int) -> int:
    """``block_size`` if it divides both widths, else their gcd with it (with a warning)."""
    b = math.gcd(block_size, d_in, d_out)
    if b != block_size:
        warnings.warn(
            f"c3a block_size={block_size} does not divide d_in={d_in} and d_out={d_out}: using "
            f"gcd {b} for this layer (PEFT refuses it).",
            UserWarning,
            stacklevel=2,
        )
    return b


def circulant(kernel: torch.Tensor) -> torch.Tensor:
    """``(m, n, b)`` kernels -> the ``(m b, n b)`` block-circulant matrix, block (i, j)[t, s] = w[i, j, (s - t) % b]."""
    m, n, b = kernel.shape
    ar = torch.arange(b, device=kernel.device)
    idx = (ar[None, :] - ar[:, None]) % b
    return kernel[:, :, idx].permute(0, 2, 1, 3).reshape(m * b, n * b)


def _to_peft(layer, cfg, t):
    """Export: the kernel as it is; a layer on a fallback block size has no PEFT form."""
    if t["lora_kernel"].shape[-1] != cfg.block_size:
        raise ll.PeftInteropError(
            f"c3a block_size={cfg.block_size} does not divide a target's widths, which uses block "
            f"{t['lora_kernel'].shape[-1]}; PEFT's C3A refuses such a layer (no per-layer block in one config "
            "without block_size_pattern). Attach with a block_size dividing every target's widths."
        )
    return t, cfg.r, cfg.alpha


class C3A:
    name = "c3a"
    config_class = C3AConfig
    additive = True  # y + delta(x)
    merged_forward = True  # dense C(w): one matmul on W + C(w) / d_in, not the base matmul plus a second one
    size_knob = None  # the trainable count d_in d_out / block_size falls as block_size grows
    lrs = (1e-2, 3e-2, 1e-1, 3e-1)  # the update is scaled by 1 / d_in: the kernel needs large steps
    # PEFT's C3A: the same kernel layout, one block size for every layer
    peft = ll.PeftFormat(
        {"lora_kernel": "c3a_kernel"}, {"bias": "none"}, convert=_to_peft, importable=True, peft_type="C3A",
        config_fields={"block_size": "block_size"}, neutral=("init_weights",),
    )

    def param_specs(d_in, d_out, cfg):
        b = block_for(d_in, d_out, cfg.block_size)
        return {"lora_kernel": ll.ParamSpec((d_out // b, d_in // b, b), init="zeros", keep_fp32=True)}

    def forward(layer, x, y):
        dw = circulant(layer.lora_kernel)
        if dw.dtype != x.dtype:
            dw = dw.to(x.dtype)
        return torch.add(y, F.linear(x, dw), alpha=1.0 / x.shape[-1])

    def merge(layer, weight, bias):
        return weight + circulant(layer.lora_kernel.to(weight)) / weight.shape[1], bias

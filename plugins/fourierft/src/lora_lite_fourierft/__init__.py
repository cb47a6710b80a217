"""FourierFT: parameter-efficient fine-tuning with the discrete Fourier transform (Gao et al.
2024, https://arxiv.org/abs/2405.03003).

Each target trains ``n`` spectral coefficients ``c`` (``n_frequency``) at ``n`` fixed
entry positions ``(j_k, l_k)`` of a ``(d_out, d_in)`` spectrum, drawn once without
replacement. The weight update is the real part of the inverse 2D DFT of that sparse
spectrum, times ``scaling``::

    F = zeros(d_out, d_in);  F[j_k, l_k] = c_k
    dW = scaling * Re(ifft2(F))                 # ifft2 includes the 1 / (d_out d_in) factor
    y' = y + x dW^T

that is ``dW[p, q] = scaling / (d_out d_in) * sum_k c_k cos(2 pi (j_k p / d_out + l_k q / d_in))``.

The positions are PEFT's: ``torch.randperm(d_out * d_in)`` on a CPU ``torch.Generator``
seeded with ``random_loc_seed`` (777 by default), first ``n`` entries, read row-major
(``j = idx // d_in``, ``l = idx % d_in``). Every layer of the same shape gets the same
positions, as in PEFT. They are stored as a persistent, non-trainable int64 tensor
``lora_index`` (the flat ``idx``), so a checkpoint reloads the positions it was trained
with, without RNG state and whatever a later torch's ``randperm`` would draw. ``init`` draws
them again at load (same seed, same numbers) and the saved copy is written over them.

Identity at init: ``c = 0``, so ``F = 0`` and ``dW = 0`` exactly. (PEFT's default
``init_weights=False`` draws ``c ~ N(0, 1)`` instead, which is not the identity; pass
nothing for it here: lora-lite always starts at the base model.)

The spectrum is kept in fp32 whatever ``cfg.dtype``: each coefficient's share of an entry
of ``dW`` is ``scaling / (d_out d_in)``, so trained coefficients are O(1), where bf16's
spacing (2^-7) would swallow learning-rate-sized steps. The dense update is built in fp32
(float64 for float64 inputs: ``ifft2`` has no bf16/fp16 kernel, as PEFT notes) and cast
to the input's dtype. ``alpha`` is not used; ``scaling`` plays its part (PEFT's
``scaling``, default 150).

Hot path (``merged_forward``): ``dW`` is dense and full rank, so on ``nn.Linear`` and GPT-2's
``Conv1D`` core runs the layer as ONE matmul on ``W + dW`` (the ``merge`` hook, differentiable in
the spectrum), as PEFT's layer does; the ``forward`` hook, ``y + x dW^T`` after the base's own
matmul, serves quantized layers, stacked attachments and mixed batches. Measured (bench, small
shape, all linears): the hook form cost 1.13x PEFT's train step (a second full matmul forward
and backward), the merged forward <= 1.0x.

Layers: any linear-like layer (``nn.Linear``, transformers ``Conv1D``, bitsandbytes
4/8-bit): on quantized layers the update is added to the base output, the weight is never read.

PEFT format (``ll.export_peft`` / ``ll.import_peft``): PEFT's ``FOURIERFT`` adapter, the
coefficients as ``fourierft_spectrum`` (bit for bit); ``n_frequency``, ``scaling`` and
``random_loc_seed`` under the same names. PEFT does not save the positions: it redraws them
from ``random_loc_seed`` at load, so ``lora_index`` is not written, and import draws it from the
seed as ``init`` does. Export refuses an attachment whose ``lora_index`` is not that draw
(edited by hand: PEFT would put the coefficients elsewhere). Import refuses
``n_frequency_pattern``, ``bias`` other than ``"none"``, ``fan_in_fan_out`` and anything else it
does not model; ``init_weights`` is accepted whatever its value (the file holds the trained
spectrum).

Not implemented from PEFT: ``n_frequency_pattern`` (lora-lite has no per-layer knobs;
attach twice with ``target_names`` instead), ``bias`` (``"all"`` / ``"fourier_only"``:
lora-lite adapters never train biases), ``init_weights=False`` (see above) and
``fan_in_fan_out`` (lora-lite reads the layer kind instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll


@dataclass
class FourierFTConfig(ll.LoraLiteConfig):
    variant: str = "fourierft"
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777

    def validate(self):
        if self.n_frequency <= 0:
            raise ll.ConfigError(f"fourierft n_frequency must be a positive integer, got {self.n_frequency}.")
        if self.scaling == 0:
            raise ll.ConfigError("fourierft scaling must be non-zero: scaling=0 makes the adapter a no-op that never trains.")
        if self.random_loc_seed < 0:
            raise ll.ConfigError(f"fourierft random_loc_seed must be >= 0 (a torch.Generator seed), got {self.random_loc_seed}.")


def _locations(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """PEFT's draw: the first n of a seeded permutation of the d_out * d_in flat positions."""
    return torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]


def _delta(layer, d_out: int, d_in: int, dtype: torch.dtype) -> torch.Tensor:
    """dW = scaling * Re(ifft2(F)) in ``dtype`` (float32 or float64), differentiable in the spectrum."""
    spectrum = layer.lora_spectrum
    if spectrum.dtype != dtype:
        spectrum = spectrum.to(dtype)
    # the scale goes on the n coefficients, not on the d_out x d_in result (the ifft is linear)
    spectrum = torch.mul(spectrum, layer.lora_cfg.scaling)
    dense = spectrum.new_zeros(d_out * d_in).index_put((layer.lora_index,), spectrum)
    return torch.fft.ifft2(dense.view(d_out, d_in)).real.contiguous()


def _delta_as(layer, d_out: int, d_in: int, dtype: torch.dtype) -> torch.Tensor:
    """dW computed in float32 (float64 for a float64 layer: the FFT has no half types), in ``dtype``."""
    delta = _delta(layer, d_out, d_in, torch.float64 if dtype == torch.float64 else torch.float32)
    return delta if delta.dtype == dtype else delta.to(dtype)


def _to_peft(layer, cfg, t):
    """Export: the spectrum only; PEFT redraws the positions from the seed, so they must be that draw."""
    d_in, d_out = ll.layer_kind(layer).features(layer)
    if not torch.equal(layer.lora_index.detach().cpu(), _locations(d_out, d_in, cfg.n_frequency, cfg.random_loc_seed)):
        raise ll.PeftInteropError(
            f"fourierft lora_index of a {d_out} x {d_in} target is not the draw of random_loc_seed="
            f"{cfg.random_loc_seed}; PEFT does not save the positions but redraws them from the seed at load, so "
            "this adapter has no PEFT form."
        )
    return t, cfg.r, cfg.alpha


class FourierFT:
    name = "fourierft"
    additive = True  # y + delta(x): rows of a batch may use different attachments
    config_class = FourierFTConfig
    merged_forward = True  # dW is dense: one matmul on W + dW (as PEFT), not the base matmul plus x dW^T
    size_knob = "n_frequency"
    # the paper trains the spectrum at 5e-2 to 1e-1 (scaling 100-300); a coefficient moves one entry of dW by scaling / (d_out d_in)
    lrs = (3e-3, 1e-2, 3e-2, 1e-1)
    # PEFT's FourierFT: the spectrum; the positions are redrawn from random_loc_seed, never saved
    peft = ll.PeftFormat(
        {"lora_spectrum": "fourierft_spectrum"}, {"fan_in_fan_out": False, "bias": "none"},
        convert=_to_peft, importable=True, peft_type="FOURIERFT",
        config_fields={"n_frequency": "n_frequency", "scaling": "scaling", "random_loc_seed": "random_loc_seed"},
        neutral=("init_weights",),
    )

    def param_specs(d_in, d_out, cfg):
        if cfg.n_frequency > d_in * d_out:
            raise ll.ConfigError(
                f"fourierft n_frequency={cfg.n_frequency} exceeds d_out * d_in = {d_out} * {d_in} = {d_in * d_out} "
                "entries of a target's spectrum; lower n_frequency or narrow the targets."
            )
        return {
            "lora_spectrum": ll.ParamSpec((cfg.n_frequency,), init="zeros", keep_fp32=True),
            # placeholder, replaced in init by the int64 positions (ParamSpec tensors are floating)
            "lora_index": ll.ParamSpec((cfg.n_frequency,), init="empty", trainable=False),
        }

    def init(layer, cfg, targets):
        t = next(t for t in targets if t.layer is layer)
        idx = _locations(t.d_out, t.d_in, cfg.n_frequency, cfg.random_loc_seed)
        layer.lora_index = nn.Parameter(idx.to(layer.lora_spectrum.device), requires_grad=False)

    def forward(layer, x, y):
        return y + F.linear(x, _delta_as(layer, y.shape[-1], x.shape[-1], x.dtype))

    def merge(layer, weight, bias):
        # W' = W + scaling * Re(ifft2(F)): exactly what forward adds; differentiable in the spectrum, so
        # on nn.Linear / Conv1D core runs the layer as one matmul on W' (merged_forward)
        return weight + _delta_as(layer, weight.shape[0], weight.shape[1], weight.dtype), bias

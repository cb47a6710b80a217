"""In-process toy variants and models for the reliability tests (no plugin of their own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll


class ToyCalibrated:
    """Data-calibrated additive variant: ``y + B A (x - mean)``, ``mean`` the calibration
    mean of the layer's input (saved, so reload needs no data). ``B`` zeros: identity."""

    name = "t_calib"
    group_init_calls = 0
    batches_seen = 0

    @staticmethod
    @ll.hookimpl
    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r)),
            "lora_mean": ll.ParamSpec((d_in,), trainable=False),
        }

    @staticmethod
    @ll.hookimpl
    def group_init(model, targets, cfg, calibration_data):
        ToyCalibrated.group_init_calls += 1
        if calibration_data is None:
            raise ll.CalibrationError(
                "t_calib needs calibration data (it centres each layer's input on its mean); "
                "pass calibration_data=[batch, ...] to attach."
            )
        sums = {t.name: torch.zeros(t.d_in) for t in targets}
        counts = dict.fromkeys(sums, 0)

        def record(name):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[name] += x.sum(0)
                counts[name] += x.shape[0]
            return hook

        handles = [t.layer.register_forward_pre_hook(record(t.name)) for t in targets]
        try:
            with torch.no_grad():
                for batch in calibration_data:
                    ToyCalibrated.batches_seen += 1
                    model(batch)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for t in targets:
                t.layer.lora_mean.copy_(sums[t.name] / max(counts[t.name], 1))

    @staticmethod
    @ll.hookimpl
    def forward(layer, x, y):
        h = F.linear(x - layer.lora_mean.to(x.dtype), layer.lora_A.to(x.dtype))
        return y + F.linear(h, layer.lora_B.to(x.dtype))


class ToyInputGate:
    """Pre-hook variant: ``x * g``, ``g`` ones (fp32)."""

    name = "t_gate"

    @staticmethod
    @ll.hookimpl
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_in,), init=1.0, keep_fp32=True)}

    @staticmethod
    @ll.hookimpl
    def forward_input(layer, x):
        return x * layer.lora_g.to(x.dtype)


TOY_VARIANTS = (ToyCalibrated, ToyInputGate)


def register_toys() -> None:
    for v in TOY_VARIANTS:
        ll.register(v)


def unregister_toys() -> None:
    for v in TOY_VARIANTS:
        if v.name in {i.name for i in ll.list_variants()}:
            ll.unregister(v.name)


class ScaledLinear(nn.Linear):
    """A linear-like layer whose forward takes an extra argument (as diffusers' LoRACompatibleLinear)."""

    def forward(self, x, scale: float = 1.0):
        return super().forward(x) * scale


class TwoScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = ScaledLinear(32, 32), ScaledLinear(32, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class DenseThenQuantized(nn.Module):
    """A dense ``nn.Linear`` followed by a bitsandbytes 4-bit layer quantized on CPU."""

    def __init__(self) -> None:
        import pytest

        bnb = pytest.importorskip("bitsandbytes")
        super().__init__()
        torch.manual_seed(0)
        self.dense = nn.Linear(32, 32)
        q = bnb.nn.Linear4bit(32, 32, quant_type="nf4", compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(torch.randn(32, 32) / 6, requires_grad=False, quant_type="nf4")
        self.qproj = q.to("cpu")

    def forward(self, x):
        return self.qproj(torch.relu(self.dense(x)))

"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022,
https://arxiv.org/abs/2205.05638). Two placements, two variants:

``ia3`` (output gate, post-hook; the paper's keys and values)::

    y' = l_out * (W x + b),        l_out: (d_out,)

``ia3_ff`` (input gate, pre-hook; the paper's feed-forward down projection)::

    y' = W (l_in * x) + b,         l_in: (d_in,)

The output gate scales the bias too, as PEFT's IA3 does (it multiplies the base
layer's whole output); the input gate leaves the bias alone.

The paper's setup uses both at once: attach ``ia3`` on k/v and ``ia3_ff`` on the
down projection, two ``lora_lite.attach`` calls on disjoint targets;
``save``/``load``/``detach`` handle both attachments together.

Identity at init: every gate starts at exactly 1.0, so ``y' = y``. The gates are
stored in float32 whatever ``cfg.dtype`` says: bf16's spacing near 1.0 (2^-7) would
swallow small optimizer steps and freeze them. ``r`` and ``alpha`` are not used.

Layers: any linear-like layer (``nn.Linear``, bitsandbytes 4/8-bit, ``Conv1D``): the
gates act on activations only and never read the base weight.
"""

from __future__ import annotations

import lora_lite as ll


class IA3:
    name = "ia3"
    size_knob = None  # one gate per output feature: the layer shapes fix the size
    lrs = (3e-3, 1e-2, 3e-2, 1e-1)  # gates start at 1 and move multiplicatively
    # PEFT's IA3: ia3_l of shape (d_out, 1) on the modules not in feedforward_modules
    peft = ll.PeftFormat({"lora_l": "ia3_l"}, {"fan_in_fan_out": False}, peft_type="IA3",
                         shapes={"lora_l": (-1, 1)}, neutral=("init_ia3_weights",))

    def param_specs(d_in, d_out, cfg):
        return {"lora_l": ll.ParamSpec((d_out,), init="ones", keep_fp32=True)}

    def forward(layer, x, y):
        return y * layer.lora_l.to(y.dtype)

    def merge(layer, weight, bias):
        # l * (W x + b) = (diag(l) W) x + l * b: the bias is scaled too
        l = layer.lora_l.float()
        return weight * l[:, None], None if bias is None else bias * l


class IA3FF:
    name = "ia3_ff"
    size_knob = None
    lrs = IA3.lrs
    # the feedforward_modules of the same PEFT IA3 adapter: ia3_l of shape (1, d_in)
    peft = ll.PeftFormat({"lora_l": "ia3_l"}, {"fan_in_fan_out": False}, peft_type="IA3",
                         shapes={"lora_l": (1, -1)}, subset="feedforward_modules", neutral=("init_ia3_weights",))

    def param_specs(d_in, d_out, cfg):
        return {"lora_l": ll.ParamSpec((d_in,), init="ones", keep_fp32=True)}

    def forward_input(layer, x):
        return x * layer.lora_l.to(x.dtype)

    def merge(layer, weight, bias):
        # W (l * x) = (W diag(l)) x; the bias is untouched
        return weight * layer.lora_l.float()[None, :], bias

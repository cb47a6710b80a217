"""Performance levers measured before deciding whether to build them (issue 19).

    python -m bench.levers fusion --shape small --repeats 7

``fusion``: sibling fusion of LoRA's A matmul. q/k/v (and gate/up) read the same input
tensor; instead of three ``x A_i^T`` products, one ``x [A_q; A_k; A_v]^T`` split into
r-wide chunks (one backward through it). The experiment builds the Qwen3 bench model
three times: the frozen base, plain LoRA hooks on every linear, and the same LoRA with
q/k/v and gate/up fused (the first sibling called computes the group's product; the
others take their chunk when they see the same input tensor object). Both LoRA models
compute the same function (checked bit for bit) and get AdamW on the same parameters.
It prints the train step ratio fused/unfused and the adapter cost ratio
(fused - base) / (unfused - base).
"""

from __future__ import annotations

import argparse
import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .run import batch, make_base, qwen3
from .timing import race, ratio

NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIBLINGS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def _with_lora(base: nn.Module, r: int) -> nn.Module:
    model = copy.deepcopy(base).requires_grad_(False)
    torch.manual_seed(0)
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in NAMES:
            m.lora_A = nn.Parameter(torch.randn(r, m.in_features) * 0.01)
            m.lora_B = nn.Parameter(torch.randn(m.out_features, r) * 0.01)
    return model


def _plain_hook(scale: float):
    return lambda m, args, y: torch.add(y, F.linear(F.linear(args[0], m.lora_A), m.lora_B), alpha=scale)


def unfused(base: nn.Module, r: int, scale: float) -> nn.Module:
    model = _with_lora(base, r)
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in NAMES:
            m.register_forward_hook(_plain_hook(scale))
    return model


class _Group:
    def __init__(self, members: list[nn.Module]) -> None:
        self.members, self.x, self.chunks, self.pending = members, None, None, set()


def _fused_hook(group: _Group, i: int, r: int, scale: float):
    def hook(m, args, y):
        x = args[0]
        if group.chunks is None or group.x() is not x or i not in group.pending:
            h = F.linear(x, torch.cat([s.lora_A for s in group.members]))
            group.x, group.chunks, group.pending = weakref.ref(x), h.split(r, dim=-1), set(range(len(group.members)))
        group.pending.discard(i)
        chunk = group.chunks[i]
        if not group.pending:  # every sibling served: drop the references
            group.x = group.chunks = None
        return torch.add(y, F.linear(chunk, m.lora_B), alpha=scale)

    return hook


def fused(base: nn.Module, r: int, scale: float) -> nn.Module:
    model = _with_lora(base, r)
    grouped = set()
    for name, parent in model.named_modules():
        members = SIBLINGS.get(name.rsplit(".", 1)[-1])
        if members:
            group = _Group([getattr(parent, n) for n in members])
            for i, m in enumerate(group.members):
                m.register_forward_hook(_fused_hook(group, i, r, scale))
                grouped.add(id(m))
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in NAMES and id(m) not in grouped:
            m.register_forward_hook(_plain_hook(scale))
    return model


def bench_fusion(shape: str, repeats: int, r: int = 8, scale: float = 2.0) -> dict:
    base = qwen3(shape)
    data = batch()
    models = {"base": make_base(base), "unfused": unfused(base, r, scale), "fused": fused(base, r, scale)}
    with torch.no_grad():
        same = torch.equal(models["unfused"](**data).logits, models["fused"](**data).logits)

    def step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None

        def run():
            model.train()
            model(**data, labels=data["input_ids"]).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return run

    res = race({k: step(m) for k, m in models.items()}, repeats, warmup=2)
    med = res["median_s"]
    return {"shape": shape, "same_function": same, "median_ms": {k: v * 1e3 for k, v in med.items()},
            "fused_over_unfused": ratio(res, "fused", "unfused"),
            "adapter_cost_fused_over_unfused": (med["fused"] - med["base"]) / (med["unfused"] - med["base"])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lever", choices=["fusion"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "small", "large"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = bench_fusion(args.shape, args.repeats)
    print(out)
    return out


if __name__ == "__main__":
    main()

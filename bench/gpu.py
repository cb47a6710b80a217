"""GPU readiness: one script that finishes in under 8 minutes on one H200.

    hatch run bench:gpu                 # on a CUDA machine: writes bench/results/gpu.{json,md}
    hatch run bench:gpu --dry           # CPU, tiny shapes, one repeat (CI runs this so it cannot rot)

1. The shared contract (``lora_lite.checks``) for every installed variant on the device,
   fp32 and bf16, with each plugin's own kit settings (found in its tests).
2. bitsandbytes 4-bit (nf4) and 8-bit layers on the device: lora and dora through the
   contract's identity, training and save/load checks.
3. A Qwen3-0.6B-shaped model from config (no download) in bf16: lora / dora / pissa on
   every linear layer against PEFT and the frozen base: train-step time, peak memory, and
   ``torch.compile`` speed of the lite train step.
4. Merged inference: lora merged into the weights vs the base model, one forward.

Timings interleave contestants round by round and report medians (bench/timing.py); on
CUDA every timed call ends with a synchronize. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lora_lite as ll
from lora_lite import checks
from lora_lite.testing import ToyTransformer

from .timing import race, ratio

QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936)
DRY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
           intermediate_size=128, vocab_size=512)
ALL_LINEARS = (r"\.q_proj$", r"\.k_proj$", r"\.v_proj$", r"\.o_proj$", r"\.gate_proj$", r"\.up_proj$", r"\.down_proj$")
CONTRACT = (checks.check_identity_at_init, checks.check_hooks_are_live, checks.check_only_adapter_tensors_get_gradients,
            checks.check_loss_drops, checks.check_save_load_into_fresh_model_is_exact, checks.check_merge_equals_hooked)
BNB_CHECKS = (checks.check_identity_at_init, checks.check_loss_drops, checks.check_save_load_into_fresh_model_is_exact)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _kits():
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.support import kits

    return kits


# -- 1. the contract on the device ---------------------------------------------------


def contract(device: str, dtypes: list[torch.dtype], log) -> list[dict]:
    kits = _kits()
    rows = []
    for info in ll.list_variants():
        for dtype in dtypes:

            class OnDevice:
                def make_model(self, _dtype=dtype):
                    torch.manual_seed(self.seed)
                    return ToyTransformer().eval().to(device, _dtype)

                def make_batch(self, model, _dtype=dtype):
                    g = torch.Generator().manual_seed(self.seed + 1)
                    return torch.randn(4, 6, model.d_model, generator=g).to(device, _dtype)

                def calibration_data(self, model):  # the batch on the device, in the model's dtype
                    return kits.calibration_for(self.variant, self.make_batch(model))

            kit = kits.kit_for(info.name, OnDevice)
            start = time.perf_counter()
            measured, failures = checks.run_checks(kit.subject(), CONTRACT)
            rows.append({"variant": info.name, "dtype": str(dtype).removeprefix("torch."), "failures": failures,
                         "identity_err": measured.get("identity_err"), "reload_err": measured.get("reload_err"),
                         "merge_err": measured.get("merge_err"), "seconds": time.perf_counter() - start})
            log(f"contract {info.name} {rows[-1]['dtype']}: {'PASS' if not failures else failures}")
    return rows


# -- 2. bitsandbytes on the device ----------------------------------------------------


def bnb(device: str, log) -> list[dict]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return [{"skipped": "bitsandbytes is not installed"}]
    kits = _kits()
    from tests.support.models import bnb_qwen3

    rows = []
    for setting in ("bnb-nf4", "bnb-int8"):
        for variant in ("lora", "dora"):

            class Quantized(kits.Qwen3Models):
                def make_model(self, _setting=setting):
                    return bnb_qwen3(_setting, self.seed).to(device)

                def make_batch(self, model):
                    return {k: v.to(device) for k, v in super().make_batch(model).items()}

            measured, failures = checks.run_checks(kits.kit_for(variant, Quantized).subject(), BNB_CHECKS)
            rows.append({"variant": variant, "layers": setting, "failures": failures,
                         "identity_err": measured.get("identity_err"), "reload_err": measured.get("reload_err")})
            log(f"bnb {setting} {variant}: {'PASS' if not failures else failures}")
    return rows


# -- 3. a Qwen3-0.6B-shaped model: lite vs PEFT vs base --------------------------------


def qwen3(dims: dict, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(max_position_embeddings=4096, use_cache=False, **dims)
    return Qwen3ForCausalLM(cfg).to(device, dtype)


def _batch(vocab: int, bs: int, seq: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (bs, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _train_step(model: nn.Module, data: dict, device: str):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = model(**data).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)

    return step


def _peak(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**20


PEFT_CONFIGS = {
    "lora": lambda t: __import__("peft").LoraConfig(r=16, lora_alpha=32, target_modules=t),
    "dora": lambda t: __import__("peft").LoraConfig(r=16, lora_alpha=32, target_modules=t, use_dora=True),
    "pissa": lambda t: __import__("peft").LoraConfig(r=16, lora_alpha=32, target_modules=t,
                                                       init_lora_weights="pissa_niter_4"),
}
LITE_KNOBS = {"lora": {}, "dora": {}, "pissa": {"svd": "lowrank", "niter": 4}}


def model_rows(dims: dict, device: str, dtype: torch.dtype, bs: int, seq: int, repeats: int, log,
               compile_backend: str = "inductor") -> list[dict]:
    import peft

    base = qwen3(dims, device, dtype)
    data = _batch(dims["vocab_size"], bs, seq, device)
    names = [n.removeprefix(r"\.").removesuffix("$") for n in ALL_LINEARS]
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_())
    rows = []
    for variant in ("lora", "dora", "pissa"):
        try:
            ll.get_variant(variant)
        except ll.UnknownVariantError:
            continue
        theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[variant](names))
        ours = copy.deepcopy(base)
        ll.attach(ours, ll.LoraLiteConfig(variant=variant, r=16, alpha=32, dtype=dtype, target_names=ALL_LINEARS,
                                          **LITE_KNOBS[variant]))
        steps = {"base": _train_step(frozen, data, device), "peft": _train_step(theirs, data, device),
                 "lite": _train_step(ours, data, device)}
        timed = race(steps, repeats=repeats, warmup=1)
        row = {"variant": variant, "median_s": timed["median_s"],
               "lite_over_peft": ratio(timed, "lite", "peft"),
               "adapter_cost_ratio": _cost(timed["median_s"]),
               "peak_mib": {k: _peak(fn, device) for k, fn in steps.items()}}
        compiled = copy.deepcopy(ours)
        compiled.forward = torch.compile(compiled.forward, backend=compile_backend)
        step_c = _train_step(compiled, data, device)
        try:
            tc = race({"eager": steps["lite"], "compiled": step_c}, repeats=repeats, warmup=2)
            row["compiled_over_eager"] = ratio(tc, "compiled", "eager")
        except Exception as err:  # record, keep going: this is a readiness report
            row["compiled_over_eager"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        log(f"qwen3 {variant}: lite/peft {row['lite_over_peft']:.3f}, adapter cost ratio {row['adapter_cost_ratio']:.3f}")
        del theirs, ours, compiled
    return rows


def _cost(median: dict) -> float:
    """(lite - base) / (PEFT - base): the adapter's own cost, lite against PEFT."""
    den = median["peft"] - median["base"]
    return (median["lite"] - median["base"]) / den if den > 0 else float("nan")


# -- 4. merged inference ----------------------------------------------------------------


def merged_rows(dims: dict, device: str, dtype: torch.dtype, bs: int, seq: int, repeats: int, log) -> dict:
    base = qwen3(dims, device, dtype).eval()
    data = {k: v for k, v in _batch(dims["vocab_size"], bs, seq, device).items() if k != "labels"}
    hooked = copy.deepcopy(base)
    ll.attach(hooked, ll.LoraLiteConfig(variant="lora", r=16, alpha=32, dtype=dtype, target_names=ALL_LINEARS))
    merged = copy.deepcopy(hooked)
    ll.merge(merged)

    def fwd(m):
        def run():
            with torch.no_grad():
                m(**data)
            _sync(device)
        return run

    timed = race({"base": fwd(base), "hooked": fwd(hooked), "merged": fwd(merged)}, repeats=repeats, warmup=1)
    out = {"median_s": timed["median_s"], "merged_over_base": ratio(timed, "merged", "base"),
           "hooked_over_base": ratio(timed, "hooked", "base")}
    log(f"merged/base {out['merged_over_base']:.3f}, hooked/base {out['hooked_over_base']:.3f}")
    return out


# -- report -----------------------------------------------------------------------------


def markdown(res: dict) -> str:
    lines = ["# lora-lite GPU readiness", "", f"{res['machine']}", ""]
    fails = [r for r in res["contract"] if r["failures"]]
    lines += [f"## Contract: {len(res['contract']) - len(fails)}/{len(res['contract'])} variant x dtype runs pass", ""]
    lines += [f"- FAIL {r['variant']} {r['dtype']}: {r['failures']}" for r in fails]
    lines += ["", "## bitsandbytes on the device", "", "| variant | layers | result |", "|---|---|---|"]
    for r in res["bnb"]:
        if "skipped" in r:
            lines.append(f"| - | - | skipped: {r['skipped']} |")
        else:
            lines.append(f"| {r['variant']} | {r['layers']} | {'PASS' if not r['failures'] else r['failures']} |")
    lines += ["", f"## {res['shape']}, bf16, all linears, r=16", "",
              "| variant | lite/PEFT step | adapter cost (lite-base)/(PEFT-base) | peak MiB base/PEFT/lite | compiled/eager |",
              "|---|---:|---:|---|---:|"]
    for r in res["models"]:
        peak = "/".join("-" if v is None else f"{v:.0f}" for v in r["peak_mib"].values())
        comp = r["compiled_over_eager"]
        lines.append(f"| {r['variant']} | {r['lite_over_peft']:.3f} | {r['adapter_cost_ratio']:.3f} | {peak} | "
                     f"{comp if isinstance(comp, str) else f'{comp:.3f}'} |")
    m = res["merged"]
    lines += ["", f"Merged inference: merged/base {m['merged_over_base']:.3f}, hooked/base {m['hooked_over_base']:.3f}.",
              "", f"Wall time {res['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, one repeat (CI)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --dry)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    if not args.dry and not device.startswith("cuda"):
        p.error("the full run needs a CUDA device; use --dry on a CPU")
    dims, bs, seq = (DRY, 2, 32) if args.dry else (QWEN3_06B, 4, 512)
    repeats = args.repeats or (1 if args.dry else 10)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)  # noqa: E731
    machine = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if device.startswith("cuda")
               else f"CPU ({platform.processor() or platform.machine()})") + f", torch {torch.__version__}"
    res = {"machine": machine, "device": device, "dry": args.dry,
           "shape": "tiny (dry run)" if args.dry else "Qwen3-0.6B-shaped"}
    res["contract"] = contract(device, [torch.float32, torch.bfloat16], log)
    res["bnb"] = bnb(device, log) if not args.dry or device == "cpu" else []
    # the dry run traces with dynamo but skips inductor's code generation (minutes on a CPU)
    res["models"] = model_rows(dims, device, torch.bfloat16, bs, seq, repeats, log,
                               compile_backend="eager" if args.dry else "inductor")
    res["merged"] = merged_rows(dims, device, torch.bfloat16, bs, seq, repeats, log)
    res["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (args.out / "gpu.md").write_text(markdown(res))
    log(f"wrote {args.out / 'gpu.json'} and gpu.md")
    return res


if __name__ == "__main__":
    main()

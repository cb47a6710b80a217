"""lora-lite vs PEFT vs the frozen base, side by side in one process.

    hatch run bench:run            # default (~10-15 min on 2 CPU cores)
    hatch run bench:run --quick    # tiny shape only, fewer repeats (~1-2 min)
    python -m bench.run --help

Every timing interleaves the contestants round by round and reports medians; a ratio is
the median of per-round ratios (lite / PEFT), so < 1 means lora-lite is faster. Results
go to bench/results/ as results.json, results.md (with machine info) and ratios.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll

from .memory import peak_bytes
from .timing import race, ratio
from .variants import PAIRINGS, TARGET_SETS, Pairing, available, lite_config

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=192),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=1536),
    "large": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                  intermediate_size=3072),
}
VOCAB, BATCH, SEQ = 1024, 4, 128
# round-2 targets (issue 19): the adapter's own cost, (lite - base) / (PEFT - base), for lora on all
# linears; no variant slower than PEFT on any shape; one-token layer calls; lora's memory delta over
# the base; compiled/eager for every variant; attach
TARGETS = {"train": 1.0, "adapter_cost": {"tiny": 0.6, "small": 0.7}, "one_token_layer": 0.5, "memory_delta": 0.8,
           "compile": 0.85, "attach": 0.10, "quickstart": 1.0, "pissa_init": 1.0}


def adapter_cost(times: dict) -> float:
    """(lite - base) / (PEFT - base) of median times: the adapter's own cost against PEFT's."""
    extra = times["peft"] - times["base"]
    return (times["lite"] - times["base"]) / extra if extra > 0 else float("nan")


def train_target(row: dict) -> float:
    return TARGETS["quickstart"] if "quickstart" in row["variant"] else TARGETS["train"]


def cost_target(row: dict) -> float | None:
    """The adapter-cost target of a models row: lora on all linears only."""
    return TARGETS["adapter_cost"].get(row["shape"]) if (row["variant"], row["targets"]) == ("lora", "all") else None


def one_token(row: dict) -> bool:
    return row["x"][:2] == [1, 1]


def qwen3(shape: str, seed: int = 0, layers: int | None = None) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    dims = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    cfg = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=SEQ, use_cache=False, **dims)
    return Qwen3ForCausalLM(cfg)


def batch(seed: int = 1, bs: int = BATCH, seq: int = SEQ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (bs, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- contestants ---------------------------------------------------------------------

def make_base(base: nn.Module) -> nn.Module:
    """The frozen base; its 'train step' backpropagates to the embeddings' output (the
    floor any adapter pays: gradients through every layer, no weight gradients)."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_())
    return model


def make_peft(base: nn.Module, p: Pairing, targets: tuple[str, ...], data: dict) -> nn.Module:
    from peft import get_peft_model

    model, config = copy.deepcopy(base), p.peft_config(targets)
    if p.peft_preprocess is not None:  # PEFT's data-driven LoRA inits prepare the base model first
        p.peft_preprocess(model, config, data)
    model = get_peft_model(model, config)
    if p.peft_calibrate is not None:
        p.peft_calibrate(model, data)
    return model


def make_lite(base: nn.Module, p: Pairing, targets: tuple[str, ...], data: dict, **overrides) -> nn.Module:
    model = copy.deepcopy(base)
    for cfg in p.lite_configs(targets, **overrides):
        ll.attach(model, cfg, calibration_data=[data] if p.calibrated else None)
    return model


def step_fns(model: nn.Module, data: dict):
    """(train step, inference forward) closures for one model."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    labels = data["input_ids"]

    def train():
        model.train()
        loss = model(**data, labels=labels).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def opt_state():
        return [[v for v in st.values() if isinstance(v, torch.Tensor)] for st in opt.state.values()] if opt else []

    train.opt_state = opt_state

    def infer():
        model.eval()
        with torch.no_grad():
            model(**data)

    return train, infer


# -- measurements --------------------------------------------------------------------

def bench_models(shapes, pairings, args, log) -> list[dict]:
    """Train step and inference forward: base vs PEFT vs lite, per shape/targets/variant,
    plus the quickstart's bf16-adapter lora against PEFT's fp32 adapter."""
    rows = []
    data = batch()
    for shape in shapes:
        base = qwen3(shape)
        jobs = [(p, tk, {}) for tk in TARGET_SETS for p in pairings]
        if "lora" in {p.name for p in pairings}:
            jobs.append((PAIRINGS["lora"], "all", {"dtype": torch.bfloat16}))
        for p, tk, overrides in jobs:
            targets = TARGET_SETS[tk]
            label = "lora-bf16 (quickstart)" if overrides else p.name
            models = {"base": make_base(base), "peft": make_peft(base, p, targets, data),
                      "lite": make_lite(base, p, targets, data, **overrides)}
            row = {"shape": shape, "targets": tk, "variant": label,
                   "trainable": {"peft": trainable(models["peft"]), "lite": trainable(models["lite"])}}
            row["trainable_equal"] = row["trainable"]["peft"] == row["trainable"]["lite"]
            fns = {k: step_fns(m, data) for k, m in models.items()}
            for i, kind in enumerate(("train", "infer")):
                res = race({k: f[i] for k, f in fns.items()}, args.repeats, warmup=args.warmup)
                row[kind] = {
                    "median_s": res["median_s"],
                    "lite_over_peft": ratio(res, "lite", "peft"),
                    "lite_over_base": ratio(res, "lite", "base"),
                    "peft_over_base": ratio(res, "peft", "base"),
                    "adapter_cost": adapter_cost(res["median_s"]),
                }
            rows.append(row)
            log(f"  {shape:5} {tk:3} {label:22} train lite/peft {row['train']['lite_over_peft']:.3f}  "
                f"infer lite/peft {row['infer']['lite_over_peft']:.3f}  "
                f"params {row['trainable']['lite']}/{row['trainable']['peft']}")
            del models, fns
    return rows


def bench_phases(shape: str, tk: str, args, log) -> dict:
    """Where a lora train step's time goes, for base / PEFT / lite: forward with autograd
    on, backward, and optimizer (+ zero_grad), each the difference of two interleaved
    timings (forward; forward + backward; the whole step)."""
    data = batch()
    base = qwen3(shape)
    p, targets, labels = PAIRINGS["lora"], TARGET_SETS[tk], data["input_ids"]
    models = {"base": make_base(base), "peft": make_peft(base, p, targets, data), "lite": make_lite(base, p, targets, data)}
    fns = {}
    for who, model in models.items():
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None

        def fwd(model=model):
            return model(**data, labels=labels).loss

        def fwd_bwd(model=model, fwd=fwd):
            fwd().backward()
            model.zero_grad(set_to_none=True)

        def step(model=model, fwd=fwd, opt=opt):
            fwd().backward()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)

        fns.update({f"{who}/fwd": fwd, f"{who}/fwd_bwd": fwd_bwd, f"{who}/step": step})
    res = race(fns, args.repeats, warmup=args.warmup)
    rounds = res["rounds_s"]
    phases = {}
    for who in models:
        f, fb, st = rounds[f"{who}/fwd"], rounds[f"{who}/fwd_bwd"], rounds[f"{who}/step"]
        phases[who] = {"forward": f, "backward": [b - a for a, b in zip(f, fb)], "optimizer": [c - b for b, c in zip(fb, st)]}
    out = {"shape": shape, "targets": tk, "variant": "lora", "median_ms": {}, "lite_over_peft": {}}
    for phase in ("forward", "backward", "optimizer"):
        out["median_ms"][phase] = {who: statistics.median(phases[who][phase]) * 1e3 for who in models}
        out["lite_over_peft"][phase] = statistics.median(
            a / b for a, b in zip(phases["lite"][phase], phases["peft"][phase]))
    log(f"  phases {shape} {tk} lora: " + "  ".join(
        f"{ph} base {m['base']:.1f} peft {m['peft']:.1f} lite {m['lite']:.1f}ms" for ph, m in out["median_ms"].items()))
    del models, fns
    return out


def bench_layer(args, log) -> list[dict]:
    """One adapted layer call: plain Linear vs PEFT's lora.Linear vs a hooked Linear, on
    a training batch (the math dominates) and on one token (call overhead dominates)."""
    from peft import LoraConfig, get_peft_model

    rows = []
    for d, lead in ((64, (BATCH, SEQ)), (512, (BATCH, SEQ)), (64, (1, 1)), (512, (1, 1))):
        torch.manual_seed(0)
        plain = nn.Sequential()
        plain.add_module("proj", nn.Linear(d, d))
        peft_model = get_peft_model(copy.deepcopy(plain), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
        peft_layer = peft_model.base_model.model.proj
        lite = copy.deepcopy(plain)
        ll.attach(lite, ll.LoraLiteConfig(variant="lora", r=8, alpha=16))
        # "floor": the same math with no hook and no module around the adapter (the plain layer,
        # then y + s B (A x) as three tensor ops): what any hook-based adapter pays at least
        a, b, base_layer = lite.proj.lora_A, lite.proj.lora_B, plain.proj
        layers = {"plain": plain.proj, "peft": peft_layer, "lite": lite.proj,
                  "floor": lambda x: torch.add(base_layer(x), F.linear(F.linear(x, a), b), alpha=2.0)}
        x = torch.randn(*lead, d)  # a training batch, and one token (decoding: per-call overhead rules)
        for mode in ("no_grad", "grad"):
            ctx = torch.no_grad if mode == "no_grad" else torch.enable_grad

            def call(layer=None):
                with ctx():
                    layer(x)

            fns = {k: (lambda layer=layer: call(layer)) for k, layer in layers.items()}
            res = race(fns, args.repeats, inner=args.layer_inner, warmup=3)
            row = {"d": d, "x": list(x.shape), "mode": mode, "median_us": {k: v * 1e6 for k, v in res["median_s"].items()},
                   "lite_over_peft": ratio(res, "lite", "peft"), "lite_over_plain": ratio(res, "lite", "plain"),
                   "peft_over_plain": ratio(res, "peft", "plain"), "floor_over_peft": ratio(res, "floor", "peft")}
            rows.append(row)
            log(f"  layer x={'x'.join(map(str, x.shape)):10} {mode:7} plain {row['median_us']['plain']:.1f}us peft {row['median_us']['peft']:.1f}us "
                f"lite {row['median_us']['lite']:.1f}us  lite/peft {row['lite_over_peft']:.3f}")
    return rows


def bench_attach(shape, args, log) -> list[dict]:
    """``ll.attach`` vs ``get_peft_model`` (fresh deep copies, copying untimed)."""
    from peft import get_peft_model

    base = qwen3(shape)
    p = PAIRINGS["lora"]
    rows = []
    for tk, targets in TARGET_SETS.items():
        times = {"lite": [], "peft": []}
        for r in range(args.repeats):
            order = ("lite", "peft") if r % 2 == 0 else ("peft", "lite")
            for who in order:
                model = copy.deepcopy(base)
                cfg = lite_config(p, targets) if who == "lite" else p.peft_config(targets)
                t0 = time.perf_counter()
                if who == "lite":
                    ll.attach(model, cfg)
                else:
                    get_peft_model(model, cfg)
                times[who].append(time.perf_counter() - t0)
                del model
        res = {"rounds_s": times, "median_s": {k: sorted(v)[len(v) // 2] for k, v in times.items()}}
        row = {"shape": shape, "targets": tk, "median_ms": {k: v * 1e3 for k, v in res["median_s"].items()},
               "lite_over_peft": ratio(res, "lite", "peft")}
        rows.append(row)
        log(f"  attach {shape} {tk}: lite {row['median_ms']['lite']:.1f}ms peft {row['median_ms']['peft']:.1f}ms "
            f"ratio {row['lite_over_peft']:.3f}")
    return rows


def bench_adapters(shape, args, log) -> dict:
    """Several LoRA adapters on one model (all linears): a mixed batch (``adapter_batch``,
    rows gathered per adapter) against looping over the adapters (``set_active`` + a forward
    on each adapter's rows), and the forward cost of inactive attachments (one active of
    four) against the model with that one attachment only. Inference, no_grad."""
    base = qwen3(shape)
    names = ["a", "b", "c", "d"]
    stacked, single = copy.deepcopy(base), copy.deepcopy(base)
    for i, name in enumerate(names):
        torch.manual_seed(i)
        ll.attach(stacked, lite_config(PAIRINGS["lora"], TARGET_SETS["all"]), name=name)
    ll.attach(single, lite_config(PAIRINGS["lora"], TARGET_SETS["all"]), name="a")
    data = batch(bs=8)
    ids = [names[i % len(names)] for i in range(8)]
    rows = {n: [i for i, x in enumerate(ids) if x == n] for n in names}
    stacked.eval(), single.eval()

    def mixed():
        with torch.no_grad(), ll.adapter_batch(stacked, ids):
            stacked(**data)

    def loop():
        with torch.no_grad():
            for n in names:
                ll.set_active(stacked, [n])
                stacked(**{k: v[rows[n]] for k, v in data.items()})
        ll.set_active(stacked, names)

    def one_of_four():
        with torch.no_grad():
            stacked(**data)

    def alone():
        with torch.no_grad():
            single(**data)

    mix = race({"mixed": mixed, "loop": loop}, repeats=args.repeats, warmup=args.warmup)
    ll.set_active(stacked, ["a"])
    inactive = race({"one_of_four": one_of_four, "alone": alone}, repeats=args.repeats, warmup=args.warmup)
    ll.set_active(stacked, names)
    out = {"shape": shape, "adapters": len(names), "batch": 8,
           "mixed_over_loop": ratio(mix, "mixed", "loop"),
           "inactive_over_alone": ratio(inactive, "one_of_four", "alone"),
           "median_ms": {k: v * 1e3 for k, v in {**mix["median_s"], **inactive["median_s"]}.items()}}
    log(f"  {shape}: mixed batch / loop over adapters {out['mixed_over_loop']:.3f}; one active of four / "
        f"one attached {out['inactive_over_alone']:.3f}")
    return out


def _identity_error(model, ref, data) -> float:
    with torch.no_grad():
        out = model(**data).logits
    return float((out - ref).abs().max() / ref.abs().max())


def bench_pissa_init(shape, args, log) -> dict:
    """PiSSA init on q/v: lite full SVD vs lite lowrank vs PEFT ``pissa_niter_4``."""
    from peft import LoraConfig, get_peft_model

    base = qwen3(shape).eval()
    data = batch(bs=1, seq=32)
    with torch.no_grad():
        ref = base(**data).logits
    p = PAIRINGS["pissa"]
    cfgs = {
        "lite_full": lambda: lite_config(p, TARGET_SETS["qv"], svd="full"),
        "lite_lowrank": lambda: lite_config(p, TARGET_SETS["qv"], svd="lowrank", niter=4),
        "peft_niter4": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGET_SETS["qv"]),
                                          init_lora_weights="pissa_niter_4"),
    }
    times = {k: [] for k in cfgs}
    err = {}
    for r in range(max(1, args.init_repeats)):
        names = list(cfgs)
        k = r % len(names)
        for name in names[k:] + names[:k]:
            model = copy.deepcopy(base)
            cfg = cfgs[name]()
            t0 = time.perf_counter()
            if name.startswith("peft"):
                model = get_peft_model(model, cfg)
            else:
                ll.attach(model, cfg)
            times[name].append(time.perf_counter() - t0)
            if r == 0:
                err[name] = _identity_error(model, ref, data)
            del model
    res = {"rounds_s": times, "median_s": {k: sorted(v)[len(v) // 2] for k, v in times.items()}}
    out = {"shape": shape, "targets": "qv", "median_s": res["median_s"], "identity_rel_err": err,
           "lowrank_over_peft": ratio(res, "lite_lowrank", "peft_niter4"),
           "full_over_peft": ratio(res, "lite_full", "peft_niter4")}
    log(f"  pissa init {shape}: " + "  ".join(f"{k} {v:.2f}s (err {err[k]:.1e})" for k, v in res["median_s"].items()))
    return out


def bench_memory(shape, pairings, log) -> list[dict]:
    """Peak live tensor bytes during one steady-state training step (params, grads,
    optimizer state, activations, temporaries)."""
    data = batch()
    base = qwen3(shape)
    rows = []
    for tk, targets in TARGET_SETS.items():
        for p in pairings:
            peak = {}
            for who in ("base", "peft", "lite"):
                model = {"base": make_base, "peft": make_peft, "lite": make_lite}[who](
                    base, *(() if who == "base" else (p, targets, data)))
                train, _ = step_fns(model, data)
                train()  # optimizer state exists from here on
                opt_state = [t for st in getattr(train, "opt_state", lambda: [])() for t in st]
                held = [*model.parameters(), *model.buffers(), *opt_state, *data.values()]
                peak[who] = peak_bytes(train, held)
                del model, train
            row = {"shape": shape, "targets": tk, "variant": p.name, "peak_bytes": peak,
                   "lite_over_peft": peak["lite"] / peak["peft"]}
            rows.append(row)
            log(f"  memory {shape} {tk} {p.name}: base {peak['base'] / 2**20:.1f}MiB peft {peak['peft'] / 2**20:.1f}MiB "
                f"lite {peak['lite'] / 2**20:.1f}MiB ratio {row['lite_over_peft']:.3f}")
    return rows


def bench_merge(shape, pairings, args, log) -> list[dict]:
    """Per variant (all linears): the time of ``ll.merge_and_unload`` vs PEFT's
    ``merge_and_unload()`` (fresh deep copies, copying untimed), and the inference forward of
    the two merged models vs the frozen base (a merged model should cost the base: ratio 1
    within noise). A PEFT method that cannot merge is recorded, the lite side still timed."""
    data = batch()
    base = qwen3(shape).eval()
    rows = []
    for p in pairings:
        lite_model = make_lite(base, p, TARGET_SETS["all"], data)
        peft_model = make_peft(base, p, TARGET_SETS["all"], data)
        row = {"shape": shape, "variant": p.name}
        times = {"lite": [], "peft": []}
        merged = {}
        for r in range(args.repeats):
            for who in (("lite", "peft") if r % 2 == 0 else ("peft", "lite")):
                if who == "peft" and "peft_error" in row:
                    continue
                model = copy.deepcopy(lite_model if who == "lite" else peft_model)
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        out = ll.merge_and_unload(model) if who == "lite" else model.merge_and_unload()
                except Exception as err:  # PEFT methods without merge support
                    row["peft_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    continue
                times[who].append(time.perf_counter() - t0)
                merged[who] = out
        row["merge_ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
        contestants = {"base": base, **merged}
        fns = {k: step_fns(m, data)[1] for k, m in contestants.items()}
        res = race(fns, args.repeats, warmup=args.warmup)
        row["infer_ms"] = {k: v * 1e3 for k, v in res["median_s"].items()}
        row["lite_merged_over_base"] = ratio(res, "lite", "base")
        if "peft" in merged:
            row["merge_lite_over_peft"] = statistics.median(a / b for a, b in zip(times["lite"], times["peft"]))
            row["lite_merged_over_peft_merged"] = ratio(res, "lite", "peft")
        rows.append(row)
        log(f"  merge {shape} {p.name}: merge lite {row['merge_ms']['lite']:.1f}ms peft "
            f"{row['merge_ms'].get('peft', float('nan')):.1f}ms; merged infer / base {row['lite_merged_over_base']:.3f}"
            + (f"; PEFT: {row['peft_error']}" if "peft_error" in row else ""))
        del lite_model, peft_model, merged, contestants, fns
    return rows


def bench_compile(shape, pairings, args, log) -> list[dict]:
    """``torch.compile(model, fullgraph=True)`` per variant (all linears): does it compile,
    and the compiled/eager ratio of the train step. One block: compile time (~30 s per
    variant with two) grows with depth, and what can break fullgraph is the same in
    every block."""
    import torch._dynamo

    data = batch()
    base = qwen3(shape, layers=1)
    rows = []
    for p in pairings:
        torch._dynamo.reset()
        model = make_lite(base, p, TARGET_SETS["all"], data)
        eager_train, _ = step_fns(model, data)
        row = {"shape": shape, "variant": p.name}
        try:
            compiled = torch.compile(model, fullgraph=True)
            t0 = time.perf_counter()
            compiled_train, _ = step_fns(compiled, data)
            compiled_train()
            row["compile_s"] = time.perf_counter() - t0
            row["compiles"] = True
            res = race({"eager": eager_train, "compiled": compiled_train}, args.repeats, warmup=1)
            row["compiled_over_eager"] = ratio(res, "compiled", "eager")
            log(f"  compile {shape} {p.name}: ok in {row['compile_s']:.1f}s, compiled/eager {row['compiled_over_eager']:.3f}")
        except Exception as err:
            row["compiles"] = False
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log(f"  compile {shape} {p.name}: FAILED {row['error']}")
        rows.append(row)
        del model
    return rows


# -- report --------------------------------------------------------------------------

def machine_info() -> dict:
    import peft
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "peft": peft.__version__, "transformers": transformers.__version__, "lora_lite": ll.__version__,
    }


def _mark(value: float, target: float) -> str:
    return "ok" if value <= target else "MISS"


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [
        "# lora-lite benchmark", "",
        f"Command: `{res['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load average "
        f"{m['loadavg_start']} -> {m.get('loadavg_end')}; Python {m['python']}, torch {m['torch']}, "
        f"peft {m['peft']}, transformers {m['transformers']}, lora-lite {m['lora_lite']}.  ",
        f"Repeats {res['args']['repeats']} (interleaved rounds; ratios are medians of per-round ratios, "
        f"lite / PEFT, < 1 is faster). Batch {BATCH} x {SEQ}, r=8, alpha=16, fp32 model. Wall time {res['wall_s']:.0f}s.",
        "",
        "## Train step (fwd + bwd + AdamW) and inference forward", "",
        "A zero-cost adapter would score base/PEFT on the train step: the floor column. The adapter's own "
        "cost is (lite - base) / (PEFT - base) of the median step times (target for lora on all linears).", "",
        "| shape | targets | variant | train lite/PEFT | target | adapter cost lite/PEFT | target | floor (base/PEFT) "
        "| infer lite/PEFT | train lite/base | train PEFT/base | lite ms | PEFT ms | base ms | trainable lite = PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["models"]:
        t, tc = train_target(r), cost_target(r)
        tr = r["train"]
        cost = tr.get("adapter_cost", float("nan"))
        out.append(
            f"| {r['shape']} | {r['targets']} | {r['variant']} | {tr['lite_over_peft']:.3f} | <= {t} "
            f"{_mark(tr['lite_over_peft'], t)} | {cost:.2f} | {'-' if tc is None else f'<= {tc} ' + _mark(cost, tc)} | "
            f"{1 / tr['peft_over_base']:.3f} | {r['infer']['lite_over_peft']:.3f} | "
            f"{tr['lite_over_base']:.3f} | "
            f"{tr['peft_over_base']:.3f} | {tr['median_s']['lite'] * 1e3:.1f} | {tr['median_s']['peft'] * 1e3:.1f} | "
            f"{tr['median_s']['base'] * 1e3:.1f} | {r['trainable']['lite']} = {r['trainable']['peft']} "
            f"{'yes' if r['trainable_equal'] else 'NO'} |"
        )
    if res.get("phases"):
        out += ["", "## Where the lora train step goes (ms; backward and optimizer are differences of timings)", "",
                "| shape | targets | phase | base | PEFT | lite | lite/PEFT | adapter cost lite/PEFT |",
                "|---|---|---|---|---|---|---|---|"]
        for r in res["phases"]:
            for ph, m in r["median_ms"].items():
                extra = (m["lite"] - m["base"]) / (m["peft"] - m["base"]) if m["peft"] != m["base"] else float("nan")
                out.append(f"| {r['shape']} | {r['targets']} | {ph} | {m['base']:.2f} | {m['peft']:.2f} | {m['lite']:.2f} | "
                           f"{r['lite_over_peft'][ph]:.3f} | {extra:.2f} |")
    out += ["", "## One adapted layer call (lora r=8)", "",
            "The floor is the same math without a hook or module around the adapter (the plain layer, then "
            "three tensor ops): floor/PEFT is the best any hook-based adapter can score.", "",
            "| d | x | autograd | plain us | PEFT us | lite us | floor us | lite/PEFT | target | floor/PEFT | lite/plain |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["layer"]:
        t = TARGETS["one_token_layer"]
        mark = f"<= {t} {_mark(r['lite_over_peft'], t)}" if one_token(r) else "-"
        out.append(f"| {r['d']} | {'x'.join(map(str, r['x']))} | {r['mode']} | {r['median_us']['plain']:.1f} | "
                   f"{r['median_us']['peft']:.1f} | {r['median_us']['lite']:.1f} | {r['median_us']['floor']:.1f} | "
                   f"{r['lite_over_peft']:.3f} | {mark} | {r['floor_over_peft']:.3f} | {r['lite_over_plain']:.2f} |")
    out += ["", "## Attach (lora) vs get_peft_model", "", "| shape | targets | lite ms | PEFT ms | lite/PEFT | target |",
            "|---|---|---|---|---|---|"]
    for r in res["attach"]:
        out.append(f"| {r['shape']} | {r['targets']} | {r['median_ms']['lite']:.1f} | {r['median_ms']['peft']:.1f} | "
                   f"{r['lite_over_peft']:.3f} | <= {TARGETS['attach']} {_mark(r['lite_over_peft'], TARGETS['attach'])} |")
    if res.get("adapters"):
        r = res["adapters"]
        out += ["", f"## Several adapters ({r['shape']}, lora on all linears, {r['adapters']} adapters, batch "
                    f"{r['batch']}, inference)", "",
                "| measurement | ratio | ms |", "|---|---|---|",
                f"| mixed batch (`adapter_batch`) / loop over adapters (`set_active` + their rows) | "
                f"{r['mixed_over_loop']:.3f} | {r['median_ms']['mixed']:.1f} / {r['median_ms']['loop']:.1f} |",
                f"| one active of four attached / that one attached alone | {r['inactive_over_alone']:.3f} | "
                f"{r['median_ms']['one_of_four']:.1f} / {r['median_ms']['alone']:.1f} |"]
    if res.get("pissa_init"):
        r = res["pissa_init"]
        out += ["", f"## PiSSA init ({r['shape']}, q/v)", "", "| method | seconds | identity rel. error |", "|---|---|---|"]
        for k, v in r["median_s"].items():
            out.append(f"| {k} | {v:.3f} | {r['identity_rel_err'][k]:.1e} |")
        out.append(f"\nlowrank / PEFT niter4: {r['lowrank_over_peft']:.3f} (target <= 1 "
                   f"{_mark(r['lowrank_over_peft'], 1.0)}); full / PEFT niter4: {r['full_over_peft']:.2f}.")
    out += ["", "## Peak memory of a training step (live tensor bytes, MiB)", "",
            "| shape | targets | variant | base | PEFT | lite | lite/PEFT | delta over base lite/PEFT | target |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in res["memory"]:
        pb = {k: v / 2**20 for k, v in r["peak_bytes"].items()}
        delta = adapter_cost(r["peak_bytes"])
        t = TARGETS["memory_delta"] if r["variant"] == "lora" else 1.0
        # PEFT's peak at or below the base's (its adapter adds nothing at the peak): no delta to compare
        mark = f"<= {t} {_mark(delta, t)}" if delta == delta else "n/a"
        out.append(f"| {r['shape']} | {r['targets']} | {r['variant']} | {pb['base']:.1f} | {pb['peft']:.1f} | "
                   f"{pb['lite']:.1f} | {r['lite_over_peft']:.3f} | {delta:.3f} | {mark} |")
    if res.get("merge"):
        out += ["", "## Merge (all linears): merge_and_unload time, merged inference forward", "",
                "A merged model is a plain model: its forward should cost the base's (ratio 1 within noise).", "",
                "| shape | variant | lite merge ms | PEFT merge ms | lite/PEFT merge | merged lite / base infer | "
                "merged lite / merged PEFT infer |", "|---|---|---|---|---|---|---|"]
        for r in res["merge"]:
            peft_ms = f"{r['merge_ms']['peft']:.1f}" if "peft" in r["merge_ms"] else "n/a: " + r.get("peft_error", "")
            out.append(f"| {r['shape']} | {r['variant']} | {r['merge_ms']['lite']:.1f} | {peft_ms} | "
                       f"{r.get('merge_lite_over_peft', float('nan')):.3f} | {r['lite_merged_over_base']:.3f} | "
                       f"{r.get('lite_merged_over_peft_merged', float('nan')):.3f} |")
    out += ["", "## torch.compile(model, fullgraph=True), train step, all linears, 1 block", "",
            "| shape | variant | compiles | compile s | compiled/eager | target |", "|---|---|---|---|---|---|"]
    for r in res["compile"]:
        ce = r.get("compiled_over_eager", float("nan"))
        out.append(f"| {r['shape']} | {r['variant']} | {'yes' if r['compiles'] else 'NO: ' + r['error']} | "
                   f"{r.get('compile_s', float('nan')):.1f} | {ce:.3f} | <= {TARGETS['compile']} "
                   f"{_mark(ce, TARGETS['compile'])} |")
    if res["skipped"]:
        out += ["", "## Skipped variants", ""] + [f"- {k}: {v}" for k, v in res["skipped"].items()]
    return "\n".join(out) + "\n"


def chart(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed; no chart"
    labels, values, targets = [], [], []
    for r in res["models"]:
        t = train_target(r)
        labels.append(f"train {r['shape']} {r['targets']} {r['variant']}")
        values.append(r["train"]["lite_over_peft"])
        targets.append(t)
    for r in res["layer"]:
        if one_token(r):
            labels.append(f"layer {'x'.join(map(str, r['x']))} {r['mode']}")
            values.append(r["lite_over_peft"])
            targets.append(TARGETS["one_token_layer"])
    for r in res["attach"]:
        labels.append(f"attach {r['shape']} {r['targets']}")
        values.append(r["lite_over_peft"])
        targets.append(TARGETS["attach"])
    if res.get("pissa_init"):
        labels.append("pissa init lowrank")
        values.append(res["pissa_init"]["lowrank_over_peft"])
        targets.append(1.0)
    for r in res["memory"]:
        labels.append(f"memory delta {r['shape']} {r['targets']} {r['variant']}")
        values.append(adapter_cost(r["peak_bytes"]))
        targets.append(TARGETS["memory_delta"] if r["variant"] == "lora" else 1.0)
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(labels) + 1.2))
    ys = range(len(labels))
    colors = ["tab:green" if v <= t else "tab:red" for v, t in zip(values, targets)]
    ax.barh(list(ys), values, color=colors)
    ax.scatter(targets, list(ys), marker="|", color="black", s=120, label="target", zorder=3)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("lora-lite / PEFT (lower is better)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shape only, fewer repeats, small init model")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds per measurement")
    ap.add_argument("--variants", default=None, help="comma-separated subset of variants")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: models,phases,layer,attach,adapters,pissa,memory,merge,compile")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a shared box)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    args.warmup = 1
    torch.set_num_threads(args.threads)
    args.layer_inner = 50 if args.quick else 200
    args.init_repeats = 1 if args.quick else 3
    skip = {s for s in args.skip.split(",") if s}
    shapes = ["tiny"] if args.quick else ["tiny", "small"]
    init_shape = "small" if args.quick else "large"

    def log(msg):
        print(msg, flush=True)

    pairings, skipped = available()
    if args.variants:
        wanted = set(args.variants.split(","))
        pairings = [p for p in pairings if p.name in wanted]
    log(f"variants: {[p.name for p in pairings]}; skipped: {skipped or 'none'}")
    t0 = time.perf_counter()
    res = {"command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
           "args": {"quick": args.quick, "repeats": args.repeats}, "machine": machine_info(),
           "targets": TARGETS, "variants": [p.name for p in pairings], "skipped": skipped,
           "models": [], "phases": [], "layer": [], "attach": [], "adapters": None, "pissa_init": None, "memory": [],
           "merge": [], "compile": []}
    if "models" not in skip:
        log("train step / inference forward:")
        res["models"] = bench_models(shapes, pairings, args, log)
    if "phases" not in skip:
        log("train step phases (lora):")
        # tiny only: on the small shape the base's matmuls swamp the adapter and the
        # differences of timings were noise (negative optimizer times)
        res["phases"] = [bench_phases("tiny", tk, args, log) for tk in TARGET_SETS]
    if "layer" not in skip:
        log("layer call:")
        res["layer"] = bench_layer(args, log)
    if "attach" not in skip:
        log("attach:")
        res["attach"] = bench_attach(shapes[-1], args, log)
    if "adapters" not in skip and "lora" in {p.name for p in pairings}:
        log("several adapters:")
        res["adapters"] = bench_adapters(shapes[-1], args, log)
    if "pissa" not in skip and "pissa" in {p.name for p in pairings}:
        log("pissa init:")
        res["pissa_init"] = bench_pissa_init(init_shape, args, log)
    if "memory" not in skip:
        log("peak memory:")
        res["memory"] = bench_memory(shapes[-1], pairings, log)
    if "merge" not in skip:
        log("merge and merged inference:")
        res["merge"] = bench_merge(shapes[-1], pairings, args, log)
    if "compile" not in skip:
        log("torch.compile fullgraph:")
        res["compile"] = bench_compile("tiny", pairings, args, log)
    res["wall_s"] = time.perf_counter() - t0
    res["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (args.out / "results.md").write_text(md)
    note = chart(res, args.out / "ratios.png")
    print("\n" + md)
    log(f"wrote {args.out}/results.json, results.md" + (f" ({note})" if note else ", ratios.png"))
    return res


if __name__ == "__main__":
    main()

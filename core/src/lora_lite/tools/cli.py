"""The ``lora-lite`` command.

    lora-lite variants            installed variants (distribution, version, module, knobs), broken plugins
    lora-lite probe               every variant end to end on a Qwen3-architecture model; table + files
    lora-lite inspect FILE        a checkpoint's metadata: variants, configs, targets, keys, versions

Each subcommand is one ``_add_<name>(subparsers)`` function that registers its parser
and sets ``func`` (``args -> exit status``); another module can add commands the same
way (``add_cli_commands(subparsers)``) and be listed in :data:`COMMANDS`. Typed
lora-lite errors print as one ``lora-lite: error: ...`` line (exit status 2), never a
traceback. ``probe`` needs ``pip install 'lora-lite-core[probe]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from importlib import import_module
from pathlib import Path
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import LoraLiteError, MissingDependencyError
from ..integrations.peft import add_cli_commands as add_peft_commands
from ..merging import add_cli_commands as add_merge_commands
from .compare import add_cli_commands as add_compare_commands

PROBE_EXTRA = "pip install 'lora-lite-core[probe]'"


def _require(modules: tuple[str, ...], command: str) -> None:
    missing = []
    for name in modules:
        try:
            import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"`lora-lite {command}` needs {', '.join(missing)} (not installed). Install with: {PROBE_EXTRA}"
        )


def _print_table(headers: list[str], rows: list[list[str]], numbers_right: bool = False) -> None:
    """Aligned columns; with ``numbers_right`` every column but the first is right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for cells in (headers, ["-" * w for w in widths], *rows):
        padded = [c.rjust(w) if numbers_right and i else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        print("  ".join(padded).rstrip())


# -- variants ----------------------------------------------------------------------------


def _add_variants(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("variants", help="list installed variants and plugins that failed to load")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_variants)


def _knobs(info) -> dict[str, Any]:
    cfg_fields = {f.name: f for f in fields(info.config_class)}
    out = {}
    for name in info.config_class.knobs():
        default = cfg_fields[name].default
        out[name] = default if isinstance(default, (int, float, str, bool, type(None))) else repr(default)
    return out


def _cmd_variants(args: argparse.Namespace) -> int:
    from ..plugins import broken_plugins, list_variants

    variants = [
        {"name": v.name, "distribution": v.distribution or "(registered in-process)", "version": v.version or "",
         "module": v.module, "knobs": _knobs(v)}
        for v in list_variants()
    ]
    broken = [{"name": b.name, "distribution": b.distribution, "version": b.version, "error": b.error}
              for b in broken_plugins()]
    if args.json:
        print(json.dumps({"core_version": __version__, "variants": variants, "broken": broken}, indent=2))
        return 1 if broken else 0
    print(f"lora-lite-core {__version__}: {len(variants)} variant(s) installed")
    if variants:
        _print_table(
            ["variant", "distribution", "version", "module", "knobs (defaults)"],
            [[v["name"], v["distribution"], v["version"], v["module"],
              ", ".join(f"{k}={val}" for k, val in v["knobs"].items()) or "-"] for v in variants],
        )
    else:
        print("no variants installed; install one, e.g. `pip install lora-lite-lora`.")
    if broken:
        print(f"\n{len(broken)} plugin(s) failed to load and were skipped:")
        for b in broken:
            print(f"  {b['name']} ({b['distribution']} {b['version']}): {b['error']}")
        return 1  # scripts and CI notice a broken install
    return 0


# -- probe -------------------------------------------------------------------------------


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="train, save and reload every variant on a Qwen3-architecture model; print the table",
        description="For each variant on a fresh base model: attach to the targets (default layer-0 q_proj and "
        "v_proj), check identity at init and live hooks, train one fixed LM batch for N steps, save, reload into "
        "another fresh base and compare logits. Writes probe.md, probe.json and loss_curves.png to --out. "
        "Exit status 1 if any check fails.",
    )
    p.add_argument("--model", default=None,
                   help="hub id or local directory (save_pretrained) of a causal LM; default: the embedded "
                        "Qwen3-architecture config with random weights (no download)")
    p.add_argument("--variants", nargs="+", metavar="NAME", type=lambda s: [v for v in s.split(",") if v],
                   help="variants to probe, space- or comma-separated (default: every installed one)")
    p.add_argument("--steps", type=int, default=8, help="training steps on the fixed batch (default 8)")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    p.add_argument("-r", "--rank", type=int, default=4, dest="r", help="adapter rank (default 4)")
    p.add_argument("--alpha", type=float, default=8.0, help="adapter alpha (default 8)")
    p.add_argument("--targets", nargs="+", metavar="REGEX", default=None,
                   help=r"module-path regexes to adapt (default: '\.q_proj$' '\.v_proj$')")
    p.add_argument("--layers", nargs="+", default=None, metavar="N",
                   help="block indices to adapt, or 'all' (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="VARIANT.KNOB=VALUE", dest="knobs",
                   help="a config field for one variant: a knob (--set delora.lambda0=1) or a shared field "
                        "(--set pissa.alpha=4); repeatable; VALUE is parsed as JSON if it can be")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded model's weights, the batch and the adapter inits")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32, help="tokens per row when the model has no tokenizer")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                   help="dtype of the model and the adapter tensors (default float32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--out", type=Path, default=Path("probe-out"), help="output folder (default probe-out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_probe)


def _parse_knobs(items: list[str]) -> dict[str, dict[str, Any]]:
    knobs: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        variant, dot, knob = key.partition(".")
        if not (sep and dot and variant and knob):
            raise argparse.ArgumentTypeError(f"--set expects VARIANT.KNOB=VALUE (e.g. delora.lambda0=1), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        knobs.setdefault(variant, {})[knob] = value
    return knobs


def _probe_settings(args: argparse.Namespace):
    import torch

    from ..integrations.hf import EMBEDDED_MODEL
    from ..plugins import list_variants
    from .probe import DEFAULT_LAYERS, DEFAULT_TARGET_NAMES, ProbeSettings

    variants = [v for group in args.variants for v in group] if args.variants else [v.name for v in list_variants()]
    if not variants:
        raise LoraLiteError("no variants are installed; install one, e.g. `pip install lora-lite-lora`.")
    if args.layers is None:
        layers = DEFAULT_LAYERS
    elif args.layers == ["all"]:
        layers = None
    else:
        try:
            layers = tuple(int(x) for x in args.layers)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--layers takes block indices or 'all', got {args.layers}") from None
    knobs = _parse_knobs(args.knobs)
    stray = sorted(set(knobs) - set(variants))
    if stray:
        raise argparse.ArgumentTypeError(f"--set names {stray}, which this run does not probe (probing {variants})")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ProbeSettings(
        model=args.model or EMBEDDED_MODEL, variants=variants, steps=args.steps, lr=args.lr, r=args.r,
        alpha=args.alpha, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
        device=device, target_names=tuple(args.targets or DEFAULT_TARGET_NAMES), layers=layers,
        knobs=knobs,
    )


def _cmd_probe(args: argparse.Namespace) -> int:
    _require(("transformers", "matplotlib", "tqdm"), "probe")
    from tqdm import tqdm

    from ..integrations.hf import load_causal_lm
    from .probe import failures_text, run_probe, table_rows, write_report

    settings = _probe_settings(args)
    if settings.steps < 1:
        raise argparse.ArgumentTypeError("--steps must be at least 1")
    base = load_causal_lm(settings.model, settings.torch_dtype, settings.seed)  # fail fast on a bad --model

    def make_base():
        nonlocal base
        if base is not None:
            fresh, base = base, None
            return fresh
        return load_causal_lm(settings.model, settings.torch_dtype, settings.seed)

    bar = tqdm(total=len(settings.variants) * settings.steps, unit="step", file=sys.stderr,
               disable=True if args.no_progress else None, leave=False)
    try:
        report = run_probe(settings, make_base, progress=bar.set_description, on_step=lambda: bar.update(1))
    finally:
        bar.close()
    paths = write_report(report, args.out)
    print(f"lora-lite probe: {settings.model} ({settings.dtype}, {settings.device}); batch: {report.batch}")
    _print_table(*table_rows(report), numbers_right=True)
    if report.passed:
        print(f"ALL CHECKS PASS ({len(report.rows)} variant(s), {report.seconds:.1f} s)")
    else:
        print("CHECKS FAILED:\n" + failures_text(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.passed else 1


# -- inspect -----------------------------------------------------------------------------


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print a checkpoint's metadata: variants, configs, targets, keys, versions")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from ..checkpoint import read_checkpoint

    records, tensors = read_checkpoint(args.checkpoint)
    with safe_open(str(args.checkpoint), framework="pt") as fh:
        meta = fh.metadata()
    shapes = {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in tensors.items()}
    if args.json:
        adapters = [{k: v for k, v in rec.items() if k != "base_fingerprint"} for rec in records]
        print(json.dumps({"path": str(args.checkpoint), "format_version": meta.get("format_version"),
                          "core_version": meta.get("core_version"), "adapters": adapters, "tensors": shapes},
                         indent=2))
        return 0
    total = sum(t.numel() for t in tensors.values())
    print(f"{args.checkpoint}: lora-lite checkpoint format {meta.get('format_version')}, "
          f"written by lora-lite-core {meta.get('core_version')}; {len(records)} adapter(s), "
          f"{len(tensors)} tensors, {total:,} values")
    for rec in records:
        print(f"\nvariant {rec['variant']} ({rec.get('plugin_distribution')} {rec.get('plugin_version')})")
        print("  config: " + ", ".join(f"{k}={v}" for k, v in rec["config"].items()))
        print(f"  targets ({len(rec['targets'])}):")
        for t in rec["targets"]:
            print(f"    {t}")
        print(f"  keys ({len(rec['keys'])}):")
        for k in rec["keys"]:
            print(f"    {k}  {tuple(shapes[k]['shape'])} {shapes[k]['dtype']}")
    return 0


# -- entry point -------------------------------------------------------------------------

COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_variants, _add_probe, _add_inspect, add_peft_commands, add_merge_commands, add_compare_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lite", description="lora-lite: LoRA-family adapters on forward hooks.")
    parser.add_argument("--version", action="version", version=f"lora-lite-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    except LoraLiteError as err:
        print(f"lora-lite: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-lite: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lora-lite variants | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Each plugin alone with core, as a user installs it: proof that no plugin leans on another.

Runs in one environment that holds lora-lite-core (non-editable) and pytest, and no
plugin. For every plugin under ``plugins/`` (or the names given): install it
(non-editable, from its directory, with its declared dependencies), check that the
variants lora-lite discovers are exactly the ones that distribution declares and that no
other plugin's package is importable, run its own tests, uninstall it. One environment
instead of one per plugin: torch is installed once, so the proof costs seconds per plugin.

    python scripts/test_plugins_isolated.py [NAME ...]     # hatch run plugin:test [NAME ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib.util, json, sys
import lora_lite as ll
names = sorted(v.name for v in ll.list_variants())
broken = [f"{b.name}: {b.error}" for b in ll.broken_plugins()]
others = [m for m in sys.argv[2:] if importlib.util.find_spec(m) is not None]
print(json.dumps({"variants": names, "broken": broken, "importable_others": others}))
"""


def plugins() -> dict[str, dict]:
    """``{directory name: pyproject}`` for every plugin (``_template`` is the authors' skeleton)."""
    found = {}
    for path in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        if not path.parent.name.startswith("_"):
            found[path.parent.name] = tomllib.loads(path.read_text())
    return found


def _uv(*args: str) -> None:
    """``uv pip ARGS`` into this interpreter; installs honour PIP_CONSTRAINT / PIP_FIND_LINKS as pip would."""
    cmd = [sys.executable, "-m", "uv", "pip", *args, "--python", sys.executable, "--quiet"]
    if args[0] == "install":
        for var, flag in (("PIP_CONSTRAINT", "--constraint"), ("PIP_FIND_LINKS", "--find-links")):
            if os.environ.get(var):
                cmd += [flag, os.environ[var]]
    subprocess.run(cmd, check=True)


def _modules(project: dict) -> list[str]:
    return [ep.split(":")[0].split(".")[0] for ep in project["project"]["entry-points"]["lora_lite.variants"].values()]


def run_one(name: str, project: dict, everything: dict[str, dict]) -> tuple[bool, str]:
    dist = project["project"]["name"]
    declared = sorted(project["project"]["entry-points"]["lora_lite.variants"])
    others = sorted({m for other, p in everything.items() if other != name for m in _modules(p)} - set(_modules(project)))
    _uv("install", str(ROOT / "plugins" / name))
    try:
        out = subprocess.run([sys.executable, "-c", CHECK, name, *others], capture_output=True, text=True, check=True)
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        if seen["variants"] != declared or seen["broken"] or seen["importable_others"]:
            return False, f"{dist} alone: expected variants {declared}, found {seen}"
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                str(ROOT / "plugins" / name / "tests")], cwd=ROOT / "plugins" / name)
        return tests.returncode == 0, f"pytest exit status {tests.returncode}"
    finally:
        _uv("uninstall", dist)


def main(argv: list[str]) -> int:
    everything = plugins()
    chosen = argv or list(everything)
    unknown = sorted(set(chosen) - set(everything))
    if unknown:
        print(f"no plugin directory for {unknown}; plugins: {', '.join(everything)}", file=sys.stderr)
        return 2
    leftovers = [n for n in everything if subprocess.run(
        [sys.executable, "-c", f"import {_modules(everything[n])[0]}"], capture_output=True).returncode == 0]
    if leftovers:
        print(f"this environment already has plugins installed ({leftovers}); run in one with core only.",
              file=sys.stderr)
        return 2
    results = []
    for name in chosen:
        start = time.perf_counter()
        ok, detail = run_one(name, everything[name], everything)
        results.append((name, ok, detail, time.perf_counter() - start))
        print(f"== {name}: {'ok' if ok else 'FAILED'} ({results[-1][3]:.0f} s)", flush=True)
    print("\nplugin alone with core:")
    for name, ok, detail, seconds in results:
        print(f"  {name:<12} {'ok' if ok else 'FAILED: ' + detail}  {seconds:.0f} s")
    return 0 if all(ok for _, ok, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

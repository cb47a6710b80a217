"""Build an sdist and a wheel of every distribution in the workspace (core and plugins/*,
not the template) into one folder, and check their metadata.

    python scripts/build_dists.py [--out dist] [--no-check]

Uses `python -m build --no-isolation`, so the running environment needs `build` and
`hatchling` (the hatch dev environment has both).
"""

from __future__ import annotations

import argparse
import email
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> list[Path]:
    plugins = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists() and not p.name.startswith("_"))
    return [ROOT / "core", *plugins]


def build(out: Path, dirs: list[Path] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for d in dirs or package_dirs():
        subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(d)],
            check=True, stdout=subprocess.DEVNULL,
        )
    return sorted(out.glob("*.whl"))


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


def check(wheel: Path) -> list[str]:
    """Problems with one wheel's metadata (empty list = complete)."""
    meta = wheel_metadata(wheel)
    problems = []
    for field in ("Name", "Version", "Summary", "License-Expression", "Requires-Python", "Author"):
        if not meta.get(field):
            problems.append(f"{wheel.name}: no {field}")
    if not meta.get_all("Project-URL"):
        problems.append(f"{wheel.name}: no Project-URL")
    if not meta.get_all("Classifier"):
        problems.append(f"{wheel.name}: no classifiers")
    if len(meta.get_payload() or "") < 40:
        problems.append(f"{wheel.name}: no long description (readme)")
    requires = meta.get_all("Requires-Dist") or []
    torch = [r for r in requires if r.split(">")[0].split("=")[0].split("<")[0].strip() == "torch"]
    if not torch or "==" in torch[0] or "<" in torch[0]:
        problems.append(f"{wheel.name}: torch must be an open lower-bounded range, got {torch}")
    if meta["Name"] != "lora-lite-core":
        core = [r for r in requires if r.startswith("lora-lite-core")]
        if not core or ">=" not in core[0] or "<" not in core[0]:
            problems.append(f"{wheel.name}: plugins must declare a bounded lora-lite-core range, got {core}")
        with zipfile.ZipFile(wheel) as zf:
            eps = next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
            if "[lora_lite.variants]" not in zf.read(eps).decode():
                problems.append(f"{wheel.name}: no lora_lite.variants entry point")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--no-check", action="store_true")
    args = parser.parse_args()
    wheels = build(args.out)
    problems = [] if args.no_check else [p for w in wheels for p in check(w)]
    for w in wheels:
        print(w.name)
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

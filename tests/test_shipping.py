"""The user's path from built artifacts: wheels with complete metadata, a fresh virtualenv
with only lora-lite-core + lora-lite-pissa, and a third-party variant made from the
template outside the workspace, checked by the conformance kit."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_dists  # noqa: E402

pytest.importorskip("build")
pytest.importorskip("hatchling")


def _closure(names: list[str]) -> set[md.Distribution]:
    """Installed distributions of ``names`` and everything they require (not extras)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return set(seen.values())


def _link_dependencies(target: Path, names: list[str]) -> None:
    """Expose already-installed dependencies (torch...) to a fresh venv by symlinks, so the
    test never downloads them; the venv sees them as installed distributions."""
    target.mkdir()
    for dist in _closure(names):
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            src = base / top
            if src.exists() and not (target / top).exists() and top not in ("..", "bin"):
                (target / top).symlink_to(src)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return build_dists.build(out)


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory, wheels):
    root = tmp_path_factory.mktemp("venv")
    venv.create(root / "env", with_pip=True)
    py = root / "env" / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip())
    _link_dependencies(root / "deps", ["torch", "pluggy", "safetensors", "numpy", "pytest"])
    (site / "zz_shared_deps.pth").write_text(str(root / "deps") + "\n")
    dist_dir = wheels[0].parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # the venv's bundled setuptools would shadow the (newer) one torch requires
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=False, env=env)
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(dist_dir), "lora-lite-core", "lora-lite-pissa"],
        check=True, env=env,
    )
    return py, env, dist_dir


def test_every_distribution_builds_with_complete_metadata(wheels):
    names = {build_dists.wheel_metadata(w)["Name"] for w in wheels}
    assert {"lora-lite-core", "lora-lite-lora", "lora-lite-pissa", "lora-lite-delora"} <= names
    assert len(list(wheels[0].parent.glob("*.tar.gz"))) == len(wheels)
    problems = [p for w in wheels for p in build_dists.check(w)]
    assert problems == []


def test_quickstart_from_wheels_in_a_fresh_venv(fresh_python, tmp_path):
    py, env, _ = fresh_python
    script = textwrap.dedent(
        """
        import torch, lora_lite as ll
        from lora_lite.testing import ToyTransformer
        assert "site-packages" in ll.__file__, ll.__file__
        print("variants", [v.name for v in ll.list_variants()])
        model = ToyTransformer()
        x = torch.randn(2, 3, 32)
        base = model(x)
        cfg = ll.LoraLiteConfig(variant="pissa", r=4, alpha=8, dtype=torch.bfloat16)
        handles = ll.attach(model, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(3):
            loss = model(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
        out = model(x).detach()
        ll.save(model, "adapter.pt"); ll.detach(model)
        assert torch.equal(model(x), base)
        ll.load(model, "adapter.pt")
        assert torch.equal(model(x), out)
        try:
            ll.LoraLiteConfig(variant="lora")
        except ll.UnknownVariantError as err:
            print("hint", err)
        """
    )
    res = subprocess.run([py, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "variants ['pissa']" in res.stdout
    assert "pip install lora-lite-lora" in res.stdout


def test_template_plugin_outside_the_workspace(fresh_python, tmp_path):
    py, env, dist_dir = fresh_python
    plugin = tmp_path / "lora-lite-sketch"
    shutil.copytree(ROOT / "plugins" / "_template", plugin)
    for path in sorted(plugin.rglob("*"), reverse=True):
        if path.is_file():
            path.write_text(path.read_text().replace("myvariant", "sketch").replace("MyVariant", "Sketch"))
        if "myvariant" in path.name:
            path.rename(path.with_name(path.name.replace("myvariant", "sketch")))
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(dist_dir), "--no-build-isolation", str(plugin)],
        check=True, env={**env, "PYTHONPATH": _hatchling_path()},
    )
    res = subprocess.run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(plugin / "tests")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert re.search(r"\b1[5-9] passed|\b[2-9]\d passed", res.stdout), res.stdout[-500:]
    listed = subprocess.run([py, "-c", "import lora_lite as ll; print(sorted(v.name for v in ll.list_variants()))"],
                            env=env, capture_output=True, text=True)
    assert listed.stdout.strip() == "['pissa', 'sketch']"


def _hatchling_path() -> str:
    """Where hatchling and its dependencies live, for a --no-build-isolation build."""
    paths = {str(Path(d.locate_file(""))) for d in _closure(["hatchling"])}
    return os.pathsep.join(sorted(paths))

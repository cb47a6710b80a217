"""Plugin selection by environment variable, in a fresh interpreter as a user would set it:
``LORA_LITE_DISABLE_PLUGINS`` / ``LORA_LITE_PLUGINS`` hide a plugin (never imported), the
others keep working, and asking for the hidden one says which variable hid it and how to
bring it back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import lora_lite as ll

SCRIPT = """
import json, sys
import torch
import lora_lite as ll
try:
    ll.LoraLiteConfig(variant="pissa")
    error = None
except ll.UnknownVariantError as err:
    error = str(err)
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
x = torch.randn(2, 4)
base = model(x)
ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2))
print(json.dumps({
    "variants": [v.name for v in ll.list_variants()],
    "error": error,
    "pissa_imported": "lora_lite_pissa" in sys.modules,
    "lora_works": bool(torch.equal(model(x), base)),
}))
"""

CASES = {
    "unset": ({}, None),
    "disable_by_entry_point": ({"LORA_LITE_DISABLE_PLUGINS": "pissa"},
                               r"disabled by LORA_LITE_DISABLE_PLUGINS='pissa'; remove 'pissa' from that variable"),
    "disable_by_distribution": ({"LORA_LITE_DISABLE_PLUGINS": "delora, lora-lite-pissa"},
                                r"disabled by LORA_LITE_DISABLE_PLUGINS='delora, lora-lite-pissa'; remove 'pissa'"),
    "select_others": ({"LORA_LITE_PLUGINS": "lora,delora"},
                      r"not selected by LORA_LITE_PLUGINS='lora,delora'; add 'pissa' to that variable, or unset it"),
}


def run(env_vars: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_LITE_PLUGINS", "LORA_LITE_DISABLE_PLUGINS")}
    env.update(env_vars, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_environment_selects_plugins_in_a_fresh_interpreter(case):
    if not {"lora", "pissa"} <= {v.name for v in ll.list_variants()}:
        pytest.skip("needs the lora and pissa plugins installed")
    env_vars, hidden = CASES[case]
    got = run(env_vars)
    assert got["lora_works"]
    if hidden is None:
        assert "pissa" in got["variants"] and got["error"] is None
        return
    assert "pissa" not in got["variants"] and "lora" in got["variants"]
    assert not got["pissa_imported"], "a disabled plugin must not even be imported"
    assert got["error"] is not None
    assert re.search(r"variant 'pissa' is installed \(lora-lite-pissa [^)]+\) but", got["error"])
    assert re.search(hidden, got["error"]), got["error"]

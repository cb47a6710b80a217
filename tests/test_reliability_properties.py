"""Property-based tests over every installed variant: random stacks of ``nn.Linear`` layers
(random widths, square or not), ranks, model and adapter dtypes (fp32, bf16, fp16) and
2D/3D/4D inputs. For each: identity at init, exact save/load round trips (fresh model
and save -> detach -> load on the same model), detach restores everything bit for bit,
gradients reach adapter tensors only, and merge equals the hooked forward (unmerge exact,
merge_and_unload clean).

Deterministic (``derandomize=True``, no example database) so CI sees the same examples
every run. A variant that refuses an example (``ConfigError``, e.g. a rank its layers
cannot take) must leave the model untouched; the example is then discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_lite as ll
from lora_lite.testing import IDENTITY_ATOL, assert_model_unchanged, snapshot_model

from .support.kits import calibration_for, config_kwargs

# the drawn widths are 2..12: RoAd's groups must divide d_out, so use its smallest group
PROPERTY_KNOBS = {"road": {"group_size": 2}}

VARIANTS = [v.name for v in ll.list_variants()]
# random widths make block-structured variants (OFT) adapt their block size, which they announce
pytestmark = pytest.mark.filterwarnings("ignore:.*does not divide d_in:UserWarning")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass(frozen=True)
class Example:
    dims: tuple[int, ...]  # widths: dims[0] -> dims[1] -> ... (one nn.Linear per step)
    r: int
    model_dtype: torch.dtype
    adapter_dtype: torch.dtype
    batch_shape: tuple[int, ...]  # leading dims of the input: 1 to 3 of them (2D to 4D inputs)
    frozen: tuple[bool, ...]  # base parameters the user froze before attaching
    seed: int

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(self.dims, self.dims[1:], strict=False)):
            layers += [nn.Linear(d_in, d_out, bias=bool(i % 2 == 0))] + ([nn.Tanh()] if i < len(self.dims) - 2 else [])
        model = nn.Sequential(*layers).to(self.model_dtype).eval()
        for p, frozen in zip(model.parameters(), self.frozen, strict=False):
            p.requires_grad_(not frozen)
        return model

    def batch(self, offset: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + offset)
        return torch.randn(*self.batch_shape, self.dims[0], generator=g).to(self.model_dtype)


@st.composite
def examples(draw) -> Example:
    n_layers = draw(st.integers(1, 3))
    if draw(st.booleans()):  # square layers half the time: some variants need d_in == d_out
        dims = (draw(st.integers(2, 12)),) * (n_layers + 1)
    else:
        dims = tuple(draw(st.lists(st.integers(2, 12), min_size=n_layers + 1, max_size=n_layers + 1)))
    return Example(
        dims=dims,
        r=draw(st.integers(1, min(dims))),
        model_dtype=draw(st.sampled_from(DTYPES)),
        adapter_dtype=draw(st.sampled_from(DTYPES)),
        batch_shape=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))),
        frozen=tuple(draw(st.lists(st.booleans(), min_size=2 * n_layers, max_size=2 * n_layers))),
        seed=draw(st.integers(0, 2**16)),
    )


def attach(variant: str, ex: Example, model: nn.Module) -> ll.Attachment:
    """Attach ``variant``; discard the example if the variant refuses it (after checking it left no trace)."""
    kwargs = {"r": ex.r, "alpha": 2.0 * ex.r, "dtype": ex.adapter_dtype,
              **config_kwargs(variant), **PROPERTY_KNOBS.get(variant, {})}
    cfg = ll.LoraLiteConfig(variant=variant, **kwargs)
    before = snapshot_model(model, ex.batch())
    try:
        return ll.attach(model, cfg, calibration_data=calibration_for(variant, ex.batch(offset=7)))
    except (ll.ConfigError, ll.CalibrationError):  # e.g. too few tokens for r components
        assert_model_unchanged(model, before, ex.batch())
        assume(False)
        raise


def perturb(att: ll.Attachment, seed: int) -> None:
    """Stand-in for training: move every trainable adapter tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))


def property_over_variants(test):
    """Run ``test(variant, ex, ...)`` for every installed variant over drawn examples."""
    return pytest.mark.parametrize("variant", VARIANTS)(PROPERTY_SETTINGS(given(ex=examples())(test)))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@property_over_variants
def test_identity_at_init(variant, ex):
    model = ex.model()
    x = ex.batch()
    base = outputs(model, x)
    attach(variant, ex, model)
    out = outputs(model, x)
    assert out.dtype == base.dtype and out.shape == base.shape
    # the tolerance of the dtype the model computes in (adapter storage must not add to it),
    # relative to the output's scale
    atol = IDENTITY_ATOL[ex.model_dtype] * max(1.0, base.abs().max().item())
    err = (out.float() - base.float()).abs().max().item()
    assert err <= atol, f"identity error {err:.3e} > {atol:.3e}"


@property_over_variants
def test_save_load_round_trip_is_exact(variant, ex, tmp_path_factory):
    model = ex.model()
    x = ex.batch()
    att = attach(variant, ex, model)
    perturb(att, ex.seed)
    trained = outputs(model, x)
    saved = {k: v.detach().clone() for k, v in att.adapter_tensors(persistent_only=True).items()}
    path = ll.save(model, tmp_path_factory.mktemp("rt") / "adapter.safetensors")

    fresh = ex.model()
    (loaded,) = ll.load(fresh, path)
    got = loaded.adapter_tensors(persistent_only=True)
    assert sorted(got) == sorted(saved)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in saved.items())
    assert torch.equal(outputs(fresh, x), trained), "fresh model: reloaded outputs differ"

    ll.detach(model)
    ll.load(model, path)
    assert torch.equal(outputs(model, x), trained), "save -> detach -> load on the same model is not exact"


@property_over_variants
def test_detach_restores_everything(variant, ex):
    model = ex.model()
    x = ex.batch()
    before = snapshot_model(model, x)
    att = attach(variant, ex, model)
    perturb(att, ex.seed)
    outputs(model, x)
    ll.detach(model)
    assert_model_unchanged(model, before, x)


@property_over_variants
def test_gradients_reach_adapter_tensors_only(variant, ex):
    model = ex.model()
    x = ex.batch()
    att = attach(variant, ex, model)
    adapter = att.adapter_tensors()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k, v in adapter.items() if v.requires_grad} and trainable
    model(x).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.dtype == p.dtype, f"adapter tensor {name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"adapter tensor {name} got a non-finite gradient"
        else:
            assert p.grad is None, f"base parameter {name} received a gradient"


@property_over_variants
def test_merge_equals_hooked_unmerge_is_exact_unload_is_clean(variant, ex):
    """Merge over drawn shapes, ranks and dtypes: the merged forward equals the hooked one
    within the model dtype's rounding (the merged weight is stored in it), the hooks stop
    contributing, unmerge restores every base tensor bit for bit, and merge_and_unload leaves
    a plain ``nn.Sequential`` computing the merged function."""
    model = ex.model()
    x = ex.batch()
    att = attach(variant, ex, model)
    assert att.variant.mergeable, f"{variant} has no merge hook"
    perturb(att, ex.seed)
    hooked = outputs(model, x)
    base_state = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    ll.merge(model)
    merged = outputs(model, x)
    # one rounding of each merged weight to the model dtype, carried through at most 3 layers
    atol = 4 * IDENTITY_ATOL[ex.model_dtype] * max(1.0, hooked.abs().max().item())
    err = (merged.float() - hooked.float()).abs().max().item()
    assert err <= atol, f"merged outputs differ from hooked ones by {err:.3e} (> {atol:.3e})"
    perturb(att, ex.seed + 1)
    assert torch.equal(outputs(model, x), merged), "after merge the hooks still contribute"
    ll.unmerge(model)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in base_state.items()), \
        "unmerge did not restore the base tensors bit for bit"
    plain = ll.merge_and_unload(model)
    assert not ll.attachments(plain) and not any(".lora_" in k for k in plain.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())
    assert set(plain.state_dict()) == set(base_state)

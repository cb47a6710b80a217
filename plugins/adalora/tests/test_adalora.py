"""AdaLoRA: the shared contract, the SVD-form equation, the budget schedule, PEFT parity."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestAdaLoRAConformance(VariantConformance):
    variant = "adalora"
    config_kwargs = {"total_step": 20}


NAMES = ["q_proj", "kv_mix", "down_proj", "up_proj"]


def _cfg(**kw):
    base = dict(variant="adalora", r=4, alpha=8, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2,
                target_names=[rf"\.{n}$" for n in NAMES])
    return ll.LoraLiteConfig(**{**base, **kw})


def test_equation_matches_the_paper():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="adalora", r=5, alpha=3.0))
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            p.normal_()
    x = torch.randn(3, 12, dtype=torch.float64)
    p_, e, q = layer.lora_B.double(), layer.lora_E.double().view(-1), layer.lora_A.double()
    delta = p_ @ torch.diag(e) @ q * (3.0 / (5 + 1e-5))
    expected = x @ (layer.weight.double() + delta).T + layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_init_is_the_identity_with_small_singular_vectors():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 3, 32)
    base = model(x)
    att = ll.attach(model, ll.LoraLiteConfig(variant="adalora", r=8))
    assert torch.equal(model(x), base)
    for t in att.targets:
        assert torch.count_nonzero(t.layer.lora_E) == 0
        for p in (t.layer.lora_A, t.layer.lora_B):
            assert 0.015 < p.std().item() < 0.025
        assert torch.equal(t.layer.lora_mask, torch.ones(8))
    assert sum(p.numel() for p in att.trainable_parameters()) == sum(8 * (t.d_in + t.d_out + 1) for t in att.targets)


@pytest.mark.parametrize("kw, match", [
    ({"target_r": 5}, "target_r"), ({"target_r": -1}, "target_r"), ({"deltaT": 0}, "deltaT"),
    ({"beta1": 1.0}, "beta1"), ({"beta2": 0.0}, "beta2"), ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
    ({"total_step": 0}, "total_step"), ({"tinit": -1}, "tinit"),
    ({"total_step": 10, "tinit": 5, "tfinal": 5}, "no step is left"),
])
def test_knobs_are_validated(kw, match):
    with pytest.raises(ll.ConfigError, match=match):
        ll.LoraLiteConfig(variant="adalora", r=4, **kw)


def test_default_target_r_is_two_thirds_of_r():
    assert ll.LoraLiteConfig(variant="adalora", r=12).final_r == 8
    assert ll.LoraLiteConfig(variant="adalora", r=1).final_r == 1


def test_step_needs_total_step_and_gradients():
    model = ToyTransformer()
    ll.attach(model, ll.LoraLiteConfig(variant="adalora", r=4))
    with pytest.raises(ll.ConfigError, match="total_step"):
        ll.step(model)
    ll.detach(model)
    ll.attach(model, ll.LoraLiteConfig(variant="adalora", r=4, total_step=5))
    with pytest.raises(ll.LoraLiteError, match="gradient"):
        ll.step(model)


def _fake_grads(params, g):
    """Identical, deterministic gradients and a plain SGD update: both sides see the same."""
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    with torch.no_grad():
        for p in params:
            p.sub_(0.05 * p.grad)


def _ours_params(att):
    return [p for t in att.targets for p in (t.layer.lora_A, t.layer.lora_E, t.layer.lora_B)]


def test_schedule_reaches_the_target_budget_and_keeps_it():
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, _cfg())
    g = torch.Generator().manual_seed(3)
    live = []
    for _ in range(16):
        _fake_grads(_ours_params(att), g)
        ll.step(model)
        live.append(int(sum(t.layer.lora_mask.sum() for t in att.targets)))
    n = len(att.targets)
    assert live[0] == 4 * n and live[-1] == 2 * n, live
    assert live == sorted(live, reverse=True)
    for t in att.targets:  # masked triplets stay at zero after the final allocation
        dead = t.layer.lora_mask == 0
        assert torch.count_nonzero(t.layer.lora_E[dead]) == 0
    assert int(att.targets[0].layer.lora_step.item()) == 16


def test_save_load_resumes_the_schedule_exactly(tmp_path):
    def run(model, att, g, steps):
        for _ in range(steps):
            _fake_grads(_ours_params(att), g)
            ll.step(model)

    torch.manual_seed(0)
    a = ToyTransformer()
    att_a = ll.attach(a, _cfg())
    run(a, att_a, torch.Generator().manual_seed(5), 5)
    ll.save(a, tmp_path / "ada.safetensors")
    torch.manual_seed(0)
    b = ToyTransformer()
    (att_b,) = ll.load(b, tmp_path / "ada.safetensors")
    run(a, att_a, torch.Generator().manual_seed(6), 6)
    run(b, att_b, torch.Generator().manual_seed(6), 6)
    for k, v in att_a.adapter_tensors().items():
        assert torch.equal(v, att_b.adapter_tensors()[k]), k


# -- PEFT parity ------------------------------------------------------------------------------


class _WithLoss(nn.Module):
    """PEFT's AdaLoraModel adds the orthogonality penalty to ``outputs.loss``."""

    def __init__(self):
        super().__init__()
        self.net = ToyTransformer()

    def forward(self, x):
        out = self.net(x)
        return SimpleNamespace(loss=out.pow(2).mean(), out=out)


def _pair(**kw):
    peft = pytest.importorskip("peft")
    cfg = _cfg(**kw)
    torch.manual_seed(0)
    ours, theirs = _WithLoss(), _WithLoss()
    theirs.load_state_dict(ours.state_dict())
    pcfg = peft.AdaLoraConfig(init_r=cfg.r, target_r=cfg.final_r, lora_alpha=cfg.alpha, target_modules=NAMES,
                              total_step=cfg.total_step, tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.deltaT,
                              beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight, lora_dropout=0.0)
    theirs = peft.get_peft_model(theirs, pcfg)
    att = ll.attach(ours, cfg)
    return ours, theirs, att, same_random_triplets(att, theirs, torch.Generator().manual_seed(1))


def lockstep(ours, theirs, pairs, g, i):
    """One SGD step with the same random gradients in both libraries, then each one's schedule."""
    grads = [torch.randn(m.shape, generator=g) for m, _ in pairs]
    with torch.no_grad():
        for (mine, peer), gr in zip(pairs, grads):
            mine.grad, peer.grad = gr.clone(), gr.clone()
            mine.sub_(0.05 * gr)
            peer.sub_(0.05 * gr)
    ll.step(ours)
    theirs.base_model.update_and_allocate(i)


def same_random_triplets(att, peft_model, g):
    """Give each target's A, E, B random values and copy them into PEFT's; the (ours, theirs) pairs."""
    pairs = []
    with torch.no_grad():
        for t in att.targets:
            mod = peft_model.get_submodule("base_model.model." + t.name)
            for x in ("A", "E", "B"):
                mine, peer = getattr(t.layer, f"lora_{x}"), getattr(mod, f"lora_{x}")["default"]
                mine.copy_(torch.randn(mine.shape, generator=g) * 0.3)
                peer.copy_(mine)
                pairs.append((mine, peer))
    return pairs


def test_outputs_and_orthogonality_penalty_match_peft():
    ours, theirs, att, pairs = _pair()
    assert len(att) == 8
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_theirs == sum(p.numel() for p in att.trainable_parameters())
    x = torch.randn(2, 5, 32)
    got, want = ours(x), theirs.base_model(x)  # AdaLoraModel.forward adds the penalty
    err = (got.out - want.out).abs().max().item()
    assert err <= 1e-5, err
    reg = (want.loss - got.loss).item()  # PEFT's loss = base loss + penalty
    torch.testing.assert_close(ll.regularization_loss(ours), torch.tensor(reg), atol=1e-5, rtol=1e-5)
    merged = ll.merge_and_unload(ours)
    assert (merged(x).out - want.out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kw", [{}, {"tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 10, "target_r": 1},
                                {"beta1": 0.5, "beta2": 0.9, "deltaT": 3, "total_step": 15}])
def test_rank_allocation_matches_peft_step_by_step(kw):
    ours, theirs, att, pairs = _pair(**kw)
    cfg = att.cfg
    g = torch.Generator().manual_seed(2)
    for i in range(cfg.total_step + 3):
        lockstep(ours, theirs, pairs, g, i)
        pattern = theirs.peft_config["default"].rank_pattern
        for t in att.targets:
            mod = theirs.get_submodule("base_model.model." + t.name)
            assert torch.equal(t.layer.lora_E, mod.lora_E["default"]), (i, t.name)
            if pattern is not None:
                key = next(k for k in pattern if k == t.name + ".lora_E.default")
                assert t.layer.lora_mask.bool().tolist() == pattern[key], (i, t.name)
    assert pattern is not None
    live = sum(sum(v) for v in pattern.values())
    assert live == cfg.final_r * len(att) == int(sum(t.layer.lora_mask.sum() for t in att.targets))

# -- PEFT's own ADALORA format: rank_pattern after a budget allocation, both ways ----------


def _peft():
    return pytest.importorskip("peft")


FMT_NAMES = ["q_proj", "v_proj", "up_proj", "down_proj"]
FMT_KW = dict(r=6, alpha=4.0, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1)


def _fmt_toy():
    torch.manual_seed(0)
    return ToyTransformer().eval()


def _out(model, x):
    with torch.no_grad():
        return model(x)


def trained_pair():
    """lora-lite and PEFT AdaLoRA stepped in lockstep (same tensors, same grads) past the final allocation."""
    ours, theirs = _fmt_toy(), _fmt_toy()
    att = ll.attach(ours, ll.LoraLiteConfig(variant="adalora", target_names=tuple(rf"\.{n}$" for n in FMT_NAMES), **FMT_KW))
    cfg = _peft().AdaLoraConfig(init_r=6, lora_alpha=4, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1,
                                target_modules=FMT_NAMES)
    theirs = _peft().get_peft_model(theirs, cfg)
    g = torch.Generator().manual_seed(1)
    pairs = same_random_triplets(att, theirs, g)
    for i in range(FMT_KW["total_step"] + 2):
        lockstep(ours, theirs, pairs, g, i)
    return ours, theirs.eval(), att


def test_peft_file_with_rank_pattern_imports_and_exports_back_to_the_same_file(tmp_path):
    ours, theirs, att = trained_pair()
    theirs.save_pretrained(str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    assert set(pattern) == {f"{t.name}.lora_E" for t in att.targets}
    assert sum(map(sum, pattern.values())) == 2 * len(att)
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    q = att.targets[0].name
    assert saved[f"base_model.model.{q}.lora_A"].shape[0] == sum(pattern[f"{q}.lora_E"]) < 6  # PEFT dropped rows

    x = torch.randn(2, 5, 32)
    loaded = _peft().PeftModel.from_pretrained(_fmt_toy(), str(tmp_path / "peft")).eval()
    want = _out(loaded, x)
    assert (want - _out(_fmt_toy(), x)).abs().max() > 1e-3
    torch.testing.assert_close(_out(ours, x), want, rtol=0, atol=1e-5)  # lockstep: the same adapter

    fresh = _fmt_toy()
    back = ll.import_peft(fresh, tmp_path / "peft")
    assert back.cfg.r == 6 and back.cfg.target_r == 2
    for t in back.targets:
        keep = torch.tensor(pattern[f"{t.name}.lora_E"])
        assert t.layer.lora_mask.bool().tolist() == keep.tolist()
        assert torch.equal(t.layer.lora_A[keep], saved[f"base_model.model.{t.name}.lora_A"])
        assert torch.equal(t.layer.lora_B[:, keep], saved[f"base_model.model.{t.name}.lora_B"])
        assert not t.layer.lora_A[~keep].any() and not t.layer.lora_E[~keep].any()
    torch.testing.assert_close(_out(fresh, x), want, rtol=0, atol=1e-5)

    # lora-lite's own export of the lockstep model is PEFT's file: same pattern, same tensors
    ll.export_peft(ours, tmp_path / "ours")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert mine["peft_type"] == "ADALORA" and mine["rank_pattern"] == pattern and mine["init_r"] == 6
    written = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(written) == set(saved) and all(torch.equal(written[k], saved[k]) for k in saved)
    again = _peft().PeftModel.from_pretrained(_fmt_toy(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_out(again, x), _out(ours, x), rtol=0, atol=1e-5)


def test_a_layer_whose_masked_E_moved_is_written_whole(tmp_path):
    model = _fmt_toy()
    att = ll.attach(model, ll.LoraLiteConfig(variant="adalora", target_names=(r"\.q_proj$",), **FMT_KW))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        first, second = att.targets[0].layer, att.targets[1].layer
        for layer in (first, second):
            layer.lora_mask[:3] = 0
        first.lora_E[:3] = 0  # masked and zero: dropped, the same function
        # second: masked, but its E moved since (deltaT > 1): all six triplets are written
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {f"{att.targets[0].name}.lora_E": [False] * 3 + [True] * 3}
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved[f"base_model.model.{att.targets[0].name}.lora_A"].shape[0] == 3
    assert saved[f"base_model.model.{att.targets[1].name}.lora_A"].shape[0] == 6
    x = torch.randn(2, 5, 32)
    loaded = _peft().PeftModel.from_pretrained(_fmt_toy(), str(tmp_path)).eval()
    torch.testing.assert_close(_out(loaded, x), _out(model, x), rtol=0, atol=1e-5)
    fresh = _fmt_toy()
    ll.import_peft(fresh, tmp_path)
    torch.testing.assert_close(_out(fresh, x), _out(model, x), rtol=0, atol=1e-6)


def test_export_refuses_what_peft_cannot_load(tmp_path):
    model = _fmt_toy()
    ll.attach(model, ll.LoraLiteConfig(variant="adalora", r=4, target_names=(r"\.q_proj$",)))  # no total_step
    with pytest.raises(ll.PeftInteropError, match="total_step"):
        ll.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()

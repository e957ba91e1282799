"""Pruning to a hardware budget: the budget grammar, the counted quantity against an independent count
of the pruned and compacted model, tightness (met, and one more group would not be), impossible budgets,
gradual rounds, and the result running on every CPU backend and the crossbar emulator."""
import pytest
import torch

import far
from far.errors import ConfigError
from far.imc.cost import HardwareSpec, model_cost
from far.methods.prune import (Budget, apply_keep_mask, array_units, budget_measure, compact_, plan_budget)
from far.models import param_counts

from conftest import max_err


def tiny(seed=0, embed_dim=48, depth=2, num_heads=2):
    torch.manual_seed(seed)
    model = far.create_model("fmnist_deit_tiny", embed_dim=embed_dim, depth=depth, num_heads=num_heads).eval()
    with torch.no_grad():  # spread the unit norms so that the ranking has no ties
        for _, m in far.far_modules(model):
            H, n = m.num_heads, m.width
            scale = torch.rand(H, 2, n) * 2
            m.w_ih.mul_(scale.unsqueeze(2).expand(H, 2, 4, n).reshape(H, 2, 4 * n, 1))
    return model


def pruned_copy(model, masks):
    """The model with `masks` applied and compacted, as far.prune leaves it."""
    import copy

    out = copy.deepcopy(model)
    for (_, m), keep in zip(far.far_modules(out), masks):
        apply_keep_mask(m, keep)
        compact_(m)
    return out


def counted(model, budget):
    """The budget's quantity counted on the model itself (no override)."""
    c = param_counts(model)
    if budget.kind == "params":
        return c["kept"]
    if budget.kind == "mixer-params":
        return c["mixer_kept"]
    t = model_cost(model, budget.cfg, budget.hw)
    if budget.kind == "energy":
        return t.totals["energy_uj"] * 1e6
    if budget.kind == "latency":
        return t.totals["latency_us"] * 1e3
    rows = [r for r in t.rows if budget.kind == "arrays" or r.kind in ("far", "attention", "reuse")]
    return sum(r.arrays + r.dynamic_arrays for r in rows)


@pytest.mark.parametrize("text,kind,value", [
    ("mixer-params=116k", "mixer-params", 116e3), ("params=2.5M", "params", 2.5e6), ("arrays=300", "arrays", 300),
    (" energy = 2e7 ", "energy", 2e7), ("latency=9e5", "latency", 9e5), ("mixer-arrays=1.5k", "mixer-arrays", 1500)])
def test_budget_grammar(text, kind, value):
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["params", "flops=3", "params=-1", "params=0", "params=abc", "params=1x", ""])
def test_budget_grammar_rejects(text):
    with pytest.raises(ConfigError):
        Budget.parse(text)


def test_param_counts_kept_and_stored_by_hand():
    model = tiny()
    (_, m0), (_, m1) = far.far_modules(model)
    full = param_counts(model)
    assert full["kept"] == full["stored"] == sum(p.numel() for p in model.parameters())
    keep = torch.ones(2, 2, 24, dtype=torch.bool)
    keep[0, 0, 5:] = False  # head 0 forward keeps 5 of 24 units; the others keep all (width stays 24)
    apply_keep_mask(m0, keep)
    c = param_counts(model)
    d = m0.head_dim  # 24
    removed = 19 * (4 * d + 4 * 24 + 8 + d)  # 19 units: W_ih rows, W_hh rows, biases, head_proj column ...
    removed += 4 * 5 * 19  # ... and the W_hh columns of the removed units in the 5 kept units' rows
    assert c["stored"] == full["stored"] and c["kept"] == full["kept"] - removed
    assert c["mixer_kept"] == full["mixer_kept"] - removed and c["mixer_stored"] == full["mixer_stored"]


@pytest.mark.parametrize("spec,hw", [
    ("mixer-params=30000", None), ("params=200000", None), ("mixer-arrays=40", None),
    ("arrays=70", HardwareSpec(packing="diagonal")), ("energy=3.9e6", None), ("latency=420000", None)])
@pytest.mark.parametrize("align", [1, 4])
def test_budget_is_met_tightly_and_counted_like_the_compacted_model(spec, hw, align):
    model = tiny()
    b = Budget.parse(spec, hw=hw)
    named = far.far_modules(model)
    plan = plan_budget(named, model, b, align=align)
    assert plan.met and plan.achieved <= b.value
    result = pruned_copy(model, plan.masks)
    assert counted(result, b) == pytest.approx(plan.achieved)  # the override counts what compaction gives
    if plan.next_up is not None:  # one group fewer removed: over the budget
        assert plan.next_up > b.value
    if align > 1:
        assert all(int(k) % align == 0 for _, m in far.far_modules(result) for k in m.hidden_sizes.flatten())
    measure = budget_measure(model, b)
    assert measure({}) == pytest.approx(counted(model, b)) == pytest.approx(plan.before)


def tight_plan(model, spec, **options):
    """plan_budget(spec, **options), checked met, tight (one group fewer removed would exceed it) and counted like
    the compacted model; returns (plan, compacted model)."""
    b = Budget.parse(spec)
    plan = plan_budget(far.far_modules(model), model, b, **options)
    assert plan.met and plan.achieved <= b.value
    if plan.next_up is not None:
        assert plan.next_up > b.value
    result = pruned_copy(model, plan.masks)
    assert counted(result, b) == pytest.approx(plan.achieved)
    return plan, result


@pytest.mark.parametrize("spec", ["energy=3.9e6", "latency=420000", "mixer-arrays=40"])
@pytest.mark.parametrize("min_units,align", [(3, 1), (4, 4), (8, 4)])
def test_min_units_floor_holds_and_the_budget_is_still_met_tightly(spec, min_units, align):
    plan, result = tight_plan(tiny(), spec, align=align, min_units=min_units)
    sizes = torch.cat([m.hidden_sizes.flatten() for _, m in far.far_modules(result)])
    assert ((sizes == 0) | (sizes >= min_units)).all() and sizes.sum() > 0, sizes
    assert f"0 or at least {min_units} units" in plan.summary()


def test_min_units_floor_changes_what_a_budget_keeps():
    # energy=3.9e6 leaves (head, direction)s with 1 and 2 units without a floor; the floor must lift or empty them
    model = tiny()
    named = far.far_modules(model)
    b = Budget.parse("energy=3.9e6")
    plain = torch.stack([k.sum(-1) for k in plan_budget(named, model, b).masks])
    assert ((plain > 0) & (plain < 3)).any(), plain
    floored = torch.stack([k.sum(-1) for k in plan_budget(named, model, b, min_units=3).masks])
    assert not ((floored > 0) & (floored < 3)).any(), floored


def test_floor_keeps_the_strongest_alive_units_by_hand():
    from far.methods.prune import _floor

    norms = torch.tensor([[[0.5, 0.9, 0.1, 0.7, 0.0], [0.3, 0.2, 0.8, 0.6, 0.4]]])  # [H=1, 2, n=5]
    alive = torch.tensor([[[True, True, True, True, False], [True, True, False, False, False]]])
    keep = torch.tensor([[[False, False, True, False, False], [True, True, False, False, False]]])
    out = _floor(keep, norms, alive, 3)
    # forward kept 1 (< 3): its 3 strongest alive units (0.9, 0.7, 0.5), the weak kept one dropped;
    # backward kept 2 with only 2 alive: unchanged
    assert out[0, 0].tolist() == [True, True, False, True, False]
    assert out[0, 1].tolist() == keep[0, 1].tolist()
    assert torch.equal(_floor(keep & False, norms, alive, 3), keep & False)  # nothing kept stays nothing
    for bad, align in ((-1, 1), (2.0, 1), (True, 1), (6, 4)):
        with pytest.raises(ConfigError, match="min_units"):
            plan_budget(far.far_modules(tiny()), tiny(), Budget.parse("mixer-params=30000"), align=align,
                        min_units=bad)


def weak_heads():
    """tiny() with block 0's head 1 and block 1's head 0 scaled down 20x: a budget's threshold empties them."""
    model = tiny()
    with torch.no_grad():
        for (_, m), h in zip(far.far_modules(model), (1, 0)):
            for t in (m.w_ih, m.w_hh, m.b_ih, m.b_hh, m.head_proj_weight):
                t[h].mul_(0.05)
    return model


@pytest.mark.parametrize("spec", ["mixer-params=17000", "mixer-arrays=30", "energy=3.9e6"])
@pytest.mark.parametrize("min_units,align", [(0, 1), (3, 1), (4, 4)])
def test_keep_heads_keeps_every_head_and_the_budget_is_still_met_tightly(spec, min_units, align):
    plan, result = tight_plan(weak_heads(), spec, align=align, min_units=min_units, keep_heads=True)
    k = max(min_units, align)
    for _, m in far.far_modules(result):
        per_head = m.hidden_sizes.sum(0)  # [H]: units over both directions
        assert (per_head >= k).all(), m.hidden_sizes
        assert ((m.hidden_sizes == 0) | (m.hidden_sizes >= max(min_units, 1))).all(), m.hidden_sizes
    assert "no head removed" in plan.summary()


def test_keep_heads_changes_what_a_budget_keeps():
    model = weak_heads()
    named = far.far_modules(model)
    b = Budget.parse("mixer-params=20000")
    plain = torch.stack([k.sum(-1) for k in plan_budget(named, model, b).masks])  # [blocks, H, 2]
    assert plain[0, 1].sum() == 0 and plain[1, 0].sum() == 0, plain  # the weak heads go without the option
    kept = torch.stack([k.sum(-1) for k in plan_budget(named, model, b, min_units=4, keep_heads=True).masks])
    assert kept[0, 1].sum() == 4 and kept[1, 0].sum() == 4 and (kept.sum(-1) > 0).all(), kept
    assert kept.sum() < plain.sum() + 8  # the revived heads' units are paid for by the others


def test_keep_heads_revives_the_strongest_direction_by_hand():
    from far.methods.prune import _floor

    norms = torch.tensor([[[0.5, 0.9, 0.1, 0.7], [0.3, 0.95, 0.8, 0.6]],
                          [[0.2, 0.1, 0.4, 0.3], [0.6, 0.5, 0.0, 0.0]]])  # [H=2, 2, n=4]
    alive = torch.tensor([[[True] * 4, [True, False, True, True]],  # head 0's strongest unit (0.95) is dead
                          [[True] * 4, [True, True, False, False]]])
    none = torch.zeros(2, 2, 4, dtype=torch.bool)
    out = _floor(none, norms, alive, 0, heads=True)  # one unit per head: its strongest alive one
    assert out[0].tolist() == [[False, True, False, False], [False] * 4]  # 0.9 forward beats 0.8 backward
    assert out[1].tolist() == [[False] * 4, [True, False, False, False]]  # 0.6 backward
    out = _floor(none, norms, alive, 3, heads=True)  # min_units 3: the 3 strongest of that direction
    assert out[0, 0].tolist() == [True, True, False, True] and not out[0, 1].any()
    assert out[1, 1].tolist() == [True, True, False, False] and not out[1, 0].any()  # only 2 alive there
    assert _floor(none, norms, alive, 0, heads=True, align=2)[0, 0].tolist() == [False, True, False, True]
    keep = none.clone()
    keep[0, 1, 3] = True  # head 0 keeps a unit: untouched by the head floor
    out = _floor(keep, norms, alive, 0, heads=True)
    assert torch.equal(out[0], keep[0]) and out[1].any()
    assert torch.equal(_floor(none, norms, alive & False, 3, heads=True), none)  # nothing alive: nothing to keep


def test_impossible_budget_says_by_how_much_and_why():
    model = tiny()
    with pytest.raises(ConfigError, match=r"cannot be met.*over.*pre_proj and proj"):
        plan_budget(far.far_modules(model), model, Budget.parse("mixer-params=1000"))
    with pytest.raises(ConfigError, match=r"cannot be met.*same crossbar cycles"):
        plan_budget(far.far_modules(model), model, Budget.parse("latency=1000"))
    with pytest.raises(ConfigError, match="cannot be met"):  # before any training
        far.prune(model, None, budget="mixer-params=1000")
    # every head keeping 4 units costs more than emptying the model: said so, before any training too
    with pytest.raises(ConfigError, match=r"cannot be met with every head kept: with 4 units per head.*over"):
        plan_budget(far.far_modules(model), model, Budget.parse("energy=3.2e6"), min_units=4, keep_heads=True)
    with pytest.raises(ConfigError, match="cannot be met with every head kept"):
        far.prune(model, None, budget="energy=3.2e6", min_units=4, keep_heads=True)
    plan_budget(far.far_modules(model), model, Budget.parse("energy=3.2e6"))  # without the option it can
    with pytest.raises(ConfigError, match="keep_heads must be True or False"):
        far.prune(model, None, budget="energy=3.5e6", keep_heads=1)


def test_array_units_fill_a_column_block():
    from far_kernels import CrossbarConfig

    assert array_units(Budget("arrays", 10)) == 4  # 128 columns / (4 gates x 4 slices x 2 cells)
    assert array_units(Budget("arrays", 10, cfg=CrossbarConfig(encoding="offset"))) == 8
    assert array_units(Budget("arrays", 10, cfg=CrossbarConfig(weight_bits=4))) == 8


def test_balance_keeps_every_block():
    model = tiny()
    (_, m0), _ = far.far_modules(model)
    with torch.no_grad():  # block 0's weights are 100x smaller: an absolute ranking empties it first
        for p in (m0.w_ih, m0.w_hh, m0.b_ih, m0.b_hh, m0.head_proj_weight):
            p.mul_(0.01)
    named = far.far_modules(model)
    b = Budget.parse("mixer-params=30000")
    plain = plan_budget(named, model, b)
    balanced = plan_budget(named, model, b, balance=True)
    assert int(plain.masks[0].sum()) == 0
    assert all(int(k.sum()) > 0 for k in balanced.masks) and balanced.met


def test_prune_to_budget_in_rounds_runs_everywhere(tmp_path):
    from conftest import cpu_backends
    from far.data import fashion_mnist
    from far.imc import emulate
    from far_kernels import CrossbarConfig
    from far_kernels.dispatch import backend_reason

    model = tiny()
    data = fashion_mnist("train", limit=64)
    cfg = far.TrainConfig(epochs=0.5, batch_size=32, progress=False, out_dir=str(tmp_path / "run"))
    out = far.prune(model, data, eval_data=fashion_mnist("test", limit=32), config=cfg, budget="mixer-params=25000",
                    rounds=2, balance=True, finetune_epochs=0.5)
    meta = out.far_metadata["pruning"]
    assert meta["budget"]["met"] and meta["budget"]["achieved"] <= 25000
    assert param_counts(out)["mixer_kept"] == meta["budget"]["achieved"] == meta["mixer_params_kept"]
    assert len(meta["per_round"]) == 2 and meta["per_round"][0]["achieved"] > meta["per_round"][1]["achieved"]
    assert (tmp_path / "run" / "round1" / "done.safetensors").is_file()
    far.save(out, tmp_path / "b.safetensors")
    loaded = far.load(tmp_path / "b.safetensors")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        far.set_backend(loaded, "torch")
        ref = loaded(x)
        for backend in cpu_backends():
            if backend_reason(backend, "cpu") is None:
                far.set_backend(loaded, backend)
                assert max_err(loaded(x), ref) < 1e-4, backend
        far.set_backend(loaded, "torch")
        # 16-bit weights and inputs, no ADC clipping: every product within ~2^-15 relative of the float one
        emu = emulate(loaded, CrossbarConfig(weight_bits=16, cell_bits=4, input_bits=16, adc_bits=None))
        assert max_err(emu(x), ref) < 1e-3 * ref.abs().max()
    # a resumed run with every round done loads the rounds and gives the same model
    again = far.prune(model, data, eval_data=fashion_mnist("test", limit=32),
                      config=far.TrainConfig(epochs=0.5, batch_size=32, progress=False, out_dir=str(tmp_path / "run"),
                                             resume=True),
                      budget="mixer-params=25000", rounds=2, balance=True, finetune_epochs=0.5)
    with torch.no_grad():
        assert max_err(again(x), out(x)) == 0


def test_prune_command_with_budget(tmp_path, capsys):
    from far.cli import main

    model = tiny()
    far.save(model, tmp_path / "s.safetensors")
    out = tmp_path / "b.safetensors"
    common = [str(tmp_path / "s.safetensors"), "--limit", "64", "--eval-limit", "32", "--batch-size", "32",
              "--epochs", "0.5", "--finetune-epochs", "0.5", "--out-dir", str(tmp_path / "run"), "-q"]
    code = main(["prune", *common, "--budget", "mixer-arrays=40", "--align", "arrays", "--hw", "packing=diagonal",
                 "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "budget mixer-arrays <= 40: achieved" in text
    pruned = far.load(out)
    b = pruned.far_checkpoint["metadata"]["pruning"]["budget"]
    assert b["met"] and b["achieved"] <= 40
    assert counted(pruned, Budget("mixer-arrays", 40, hw=HardwareSpec(packing="diagonal"))) == b["achieved"]
    assert all(int(k) % 4 == 0 for _, m in far.far_modules(pruned) for k in m.hidden_sizes.flatten())
    # no Hoyer epoch and no fine-tune: the run folder is made for the masked model all the same
    code = main(["prune", str(tmp_path / "s.safetensors"), "--limit", "32", "--eval-limit", "32", "--epochs", "0",
                 "--finetune-epochs", "0", "--budget", "mixer-params=30000", "--out-dir", str(tmp_path / "fresh" / "run"),
                 "-o", str(tmp_path / "e0.safetensors"), "-q"])
    assert code == 0 and (tmp_path / "fresh" / "run" / "masked.safetensors").is_file()
    capsys.readouterr()
    # refused before any training, the output untouched: by how much and why
    for extra, match in ((["--budget", "mixer-params=100"], "cannot be met"),
                         (["--budget", "mixer-params=1k", "--prune-ratio", "0.3"], "give one of"),
                         (["--align", "arrays"], "give --budget"), (["--hw", "cols=64"], "give --budget"),
                         (["--budget", "flops=3"], "unknown budget"), (["--budget", "params=1e6", "--hw", "packing=x"], "packing")):
        code = main(["prune", *common, *extra, "-o", str(tmp_path / "never.safetensors")])
        err = capsys.readouterr().err
        assert code == 2 and match in err, (extra, err)
        assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize("align,min_units", [(1, 0), (2, 2)])
def test_a_budget_on_a_model_with_every_unit_removed_is_planned(align, min_units):
    # no alive group: the threshold was taken from the last of no norms (IndexError); a model pruned to nothing
    # already meets any budget it can meet, with nothing removed
    model = tiny()
    for _, m in far.far_modules(model):
        apply_keep_mask(m, torch.zeros(m.num_heads, 2, m.width, dtype=torch.bool))
        compact_(m)
    named = far.far_modules(model)
    budget = Budget("mixer-params", float(param_counts(model)["mixer_kept"]))
    plan = plan_budget(named, model, budget, align=align, min_units=min_units)
    assert plan.met and plan.pruned_groups == plan.groups == 0 and plan.threshold == 0.0
    assert all(not k.any() for k in plan.masks)


@pytest.mark.parametrize("min_units,keep_heads,align", [(3, False, 1), (0, True, 1), (2, True, 2), (4, False, 4)])
def test_floors_keep_the_units_the_ranking_keeps_when_norms_tie(min_units, keep_heads, align):
    """plan_budget removes groups weakest first, equal norms in (head, direction, unit) order (a stable sort), and
    the floors then revive 'the strongest' units, which must be ones the ranking still kept: every step's kept set
    lies inside the previous step's. With tied norms (low-precision or quantized weights) torch.topk picked any of
    the tied units, so a floor could revive a unit removed before and drop one still kept."""
    from far.methods.prune import _align, _floor

    checked = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        H, n = 2, 8
        norms = torch.randint(1, 4, (H, 2, n), generator=g).double()  # 3 values in 32 groups: ties everywhere
        alive = torch.ones(H, 2, n, dtype=torch.bool)
        order = torch.sort(norms.flatten(), stable=True).indices
        prev = alive
        for j in range(1, order.numel() + 1):
            keep = alive.clone()
            keep.view(-1)[order[:j]] = False
            keep = _floor(keep, norms, alive, min_units, keep_heads, align)
            if align > 1:
                keep = _align(keep, norms, align)
            assert not (keep & ~prev).any(), (seed, j)  # nothing comes back that an earlier step removed
            prev = keep
            checked += 1
    assert checked == 40 * 32


@pytest.mark.parametrize("spec", ["energy=3.9e6", "mixer-params=17000", "mixer-arrays=30"])
def test_keep_heads_with_align_and_no_unit_floor_keeps_every_head(spec):
    """keep_heads with align > 1 and min_units 0: a head left with 1 to align - 1 units (in one direction or
    both) is emptied by align's rounding after the head floor looked at it; it used to lose every unit (tiny(0)
    at energy=3.9e6, align 4: block 0's head 1). The head floor now counts such a head as emptied."""
    for model in (tiny(0), weak_heads()):
        plan, result = tight_plan(model, spec, align=4, min_units=0, keep_heads=True)
        for _, m in far.far_modules(result):
            assert (m.hidden_sizes.sum(0) >= 4).all() and (m.hidden_sizes % 4 == 0).all(), m.hidden_sizes


def test_keep_heads_least_model_of_an_already_pruned_model():
    """keep_heads' least model is every head keeping min_units of its strongest direction's units, all of them where
    that direction has fewer (a model pruned before, or a later round). check_budget counted min_units of the
    head's larger direction instead, and refused a budget the plan meets (here 2 forward units per head, counted
    as 4): before any training in far.prune too."""
    from conftest import HalvesImages

    model = tiny()
    for _, m in far.far_modules(model):
        keep = torch.zeros(m.num_heads, 2, m.width, dtype=torch.bool)
        keep[:, 0, :2] = True
        keep[:, 1, :10] = True
        with torch.no_grad():
            m.w_ih.view(m.num_heads, 2, 4, m.width, -1)[:, 0, :, 0].mul_(50)  # each head's strongest: forward
        apply_keep_mask(m, keep)
        compact_(m)
    named = far.far_modules(model)
    least = {n: torch.tensor([[2] * m.num_heads, [0] * m.num_heads]) for n, m in named}
    value = budget_measure(model, Budget("mixer-params", 1.0))(least)
    plan, result = tight_plan(model, f"mixer-params={value}", min_units=4, keep_heads=True)
    assert plan.achieved == value and all(torch.equal(m.hidden_sizes, least[n]) for n, m in far.far_modules(result))
    with pytest.raises(ConfigError, match="cannot be met with every head kept"):
        tight_plan(model, f"mixer-params={value - 1}", min_units=4, keep_heads=True)
    cfg = far.TrainConfig(epochs=0, batch_size=8, progress=False)
    out = far.prune(model, HalvesImages(8), config=cfg, budget=f"mixer-params={value}", min_units=4, keep_heads=True,
                    finetune_epochs=0)
    assert param_counts(out)["mixer_kept"] == value

"""Pruning: group norms against an explicit per-unit loop, Hoyer-square, the global threshold removes
exactly the groups under it, masking = dropping those units, compaction keeps the outputs."""
import pytest
import torch

import far
from far.cli.pruning import plot_kept
from far.methods.prune import (apply_keep_mask, compact_, global_threshold, group_norms, hoyer_square, keep_masks,
                               kept_table, lstm_param_count)

from conftest import far_block_oracle, max_err


def block(seed, hidden_sizes=None, C=48, H=2):
    torch.manual_seed(seed)
    m = far.FARAttention(C, H, hidden_sizes=hidden_sizes).double()
    with torch.no_grad():
        for p in (m.b_ih, m.b_hh, m.head_proj_bias):
            p.add_(0.1 * torch.randn_like(p))
        # spread the group norms so that thresholds are unambiguous
        scale = torch.rand(H, 2, m.width, dtype=torch.float64) * 2
        n = m.width
        m.w_ih.mul_(scale.unsqueeze(2).expand(H, 2, 4, n).reshape(H, 2, 4 * n, 1))
        m.zero_padding_()
    return m


def explicit_group_norm(m, head, direction, unit):
    """The group of one unit, gathered entry by entry (W_hh's diagonal entries counted once)."""
    n, d = m.width, m.head_dim
    entries = []
    for q in range(4):
        r = q * n + unit
        entries += [m.w_ih[head, direction, r, j] for j in range(d)]
        entries += [m.w_hh[head, direction, r, j] for j in range(n)]
        entries += [m.b_ih[head, direction, r], m.b_hh[head, direction, r]]
    for r in range(4 * n):
        if r % n != unit:  # rows of unit u already hold column u's entry
            entries.append(m.w_hh[head, direction, r, unit])
    entries += [m.head_proj_weight[head, j, direction * n + unit] for j in range(d)]
    return float(torch.stack(entries).detach().square().sum().sqrt())


def test_group_norms_match_explicit_groups():
    m = block(0, hidden_sizes=[[24, 5], [24, 17]])
    g = group_norms(m)
    mask = m.unit_mask()
    for h in range(2):
        for r in range(2):
            for u in range(m.width):
                want = explicit_group_norm(m, h, r, u) if mask[h, r, u] else 0.0
                assert abs(float(g[h, r, u]) - want) < 1e-10, (h, r, u)


def test_hoyer_square_range_and_gradient():
    m = block(1)
    hs = hoyer_square(m)
    G = int(m.hidden_sizes.sum())
    assert 1.0 <= float(hs) <= G
    hs.backward()
    assert m.w_hh.grad is not None and torch.isfinite(m.w_hh.grad).all()
    # scale invariance: multiplying every group by 3 leaves it unchanged
    with torch.no_grad():
        for p in (m.w_ih, m.w_hh, m.b_ih, m.b_hh, m.head_proj_weight):
            p.mul_(3)
    assert abs(float(hoyer_square(m)) - float(hs)) < 1e-9


def test_global_threshold_removes_exactly_the_groups_below_it():
    mods = [block(2), block(3, hidden_sizes=[[24, 10], [3, 24]])]
    norms = torch.cat([group_norms(m)[m.unit_mask()] for m in mods])
    thr = global_threshold(mods, prune_ratio=0.4)
    assert int((norms < thr).sum()) == round(0.4 * norms.numel())
    before = [(group_norms(m).detach(), m.unit_mask(), m.w_ih.detach().clone(), m.head_proj_weight.detach().clone())
              for m in mods]
    masks = keep_masks(mods, thr)
    for m, keep, (g, um, w_ih, hp) in zip(mods, masks, before):
        assert torch.equal(keep, (g >= thr) & um)
        apply_keep_mask(m, keep)
        n, d = m.width, m.head_dim
        # the kept units are exactly those at or above the threshold, moved to the front in their order:
        # their own W_ih rows and head_proj columns (entries no other group shares) are the old ones
        for h in range(m.num_heads):
            for r in range(2):
                k = int(m.hidden_sizes[r, h])
                assert k == int(keep[h, r].sum())
                assert torch.equal(m.w_ih[h, r].view(4, n, d)[:, :k], w_ih[h, r].view(4, n, d)[:, keep[h, r]])
                assert torch.equal(m.head_proj_weight[h, :, r * n:r * n + k], hp[h, :, r * n:(r + 1) * n][:, keep[h, r]])
                assert (group_norms(m)[h, r, k:] == 0).all() and (group_norms(m)[h, r, :k] > 0).all()
    assert global_threshold(mods, threshold=0.5) == 0.5
    with pytest.raises(ValueError, match="exactly one"):
        global_threshold(mods, prune_ratio=0.1, threshold=0.1)
    with pytest.raises(ValueError, match="prune-ratio"):
        global_threshold(mods, prune_ratio=1.5)


def test_masking_equals_dropping_units_and_compaction_keeps_outputs():
    m = block(4)
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    keep = group_norms(m) >= global_threshold([m], prune_ratio=0.5)
    # oracle: zero the pruned units' groups in place (no reordering), per-head nn.LSTM in float64
    ref = block(4)
    with torch.no_grad():
        n = ref.width
        drop = ~keep
        rows = drop.unsqueeze(2).expand(2, 2, 4, n).reshape(2, 2, 4 * n)
        ref.w_ih[rows] = 0
        ref.b_ih[rows] = 0
        ref.b_hh[rows] = 0
        ref.w_hh[rows] = 0
        ref.w_hh.masked_fill_(drop.unsqueeze(2), 0)  # columns of pruned units
        ref.head_proj_weight.masked_fill_(drop.reshape(2, 1, 2 * n), 0)
    want = far_block_oracle(ref, x)
    apply_keep_mask(m, keep)
    assert m.width == 24 and int(m.hidden_sizes.sum()) == int(keep.sum())
    masked = far_block_oracle(m, x)
    assert max_err(masked, want) < 1e-10
    with torch.no_grad():
        y_masked = m.eval()(x)
    compact_(m)
    assert m.width == int(m.hidden_sizes.max()) < 24
    with torch.no_grad():
        y_compact = m(x)
    assert max_err(y_compact, y_masked) < 1e-12
    assert max_err(y_compact, want) < 1e-10


def test_pruned_model_round_trips_and_runs_on_every_cpu_backend(tmp_path):
    from conftest import cpu_backends
    from far_kernels.dispatch import backend_reason

    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", embed_dim=48, depth=2, num_heads=2).eval()
    mods = [m for _, m in far.far_modules(model)]
    thr = global_threshold(mods, prune_ratio=0.35)
    for m, keep in zip(mods, keep_masks(mods, thr)):
        apply_keep_mask(m, keep)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        y_masked = model(x)
    before = lstm_param_count(model)
    for m in mods:
        compact_(m)
    assert lstm_param_count(model) == before
    far.save(model, tmp_path / "p.safetensors")
    loaded = far.load(tmp_path / "p.safetensors")
    for backend in cpu_backends():
        if backend_reason(backend, "cpu") is not None:
            continue
        far.set_backend(loaded, backend)
        with torch.no_grad():
            assert max_err(loaded(x), y_masked) < 1e-4, backend
    rows = kept_table(loaded)
    assert len(rows) == 2 * 2 * 2 and sum(r["kept"] for r in rows) == sum(int(m.hidden_sizes.sum()) for m in mods)
    assert plot_kept(loaded, tmp_path / "kept.png") is None and (tmp_path / "kept.png").stat().st_size > 0


def test_prune_command_end_to_end(tmp_path, capsys):
    from far.cli import main

    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", embed_dim=48, depth=2, num_heads=2)
    far.save(model, tmp_path / "s.safetensors")
    out = tmp_path / "pruned.safetensors"
    code = main(["prune", str(tmp_path / "s.safetensors"), "--limit", "64", "--eval-limit", "64", "--batch-size", "32",
                 "--epochs", "0.5", "--finetune-epochs", "0.5", "--prune-ratio", "0.4", "--hoyer", "1e-2",
                 "--out-dir", str(tmp_path / "run"), "-o", str(out), "-q"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "fewer" in text and "kept units per block" in text
    pruned = far.load(out)
    meta = pruned.far_checkpoint["metadata"]["pruning"]
    assert meta["lstm_params_after"] < 0.75 * meta["lstm_params_before"]
    assert (tmp_path / "run" / "kept_units.png").is_file()
    assert out.stat().st_size < (tmp_path / "s.safetensors").stat().st_size


def test_prune_command_min_units_floor_with_a_ratio(tmp_path, capsys):
    from far.cli import main

    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", embed_dim=48, depth=2, num_heads=2)
    far.save(model, tmp_path / "s.safetensors")
    common = [str(tmp_path / "s.safetensors"), "--limit", "32", "--eval-limit", "32", "--batch-size", "32",
              "--epochs", "0", "--finetune-epochs", "0", "-q"]
    sizes = {}
    for floor in (0, 4):
        out = tmp_path / f"p{floor}.safetensors"
        code = main(["prune", *common, "--prune-ratio", "0.9", "--min-units", str(floor), "-o", str(out)])
        assert code == 0, capsys.readouterr()
        pruned = far.load(out)
        sizes[floor] = torch.cat([m.hidden_sizes.flatten() for _, m in far.far_modules(pruned)])
        assert pruned.far_checkpoint["metadata"]["pruning"]["min_units"] == floor
    assert ((sizes[0] > 0) & (sizes[0] < 4)).any(), sizes[0]  # the ratio alone leaves short (head, direction)s
    assert ((sizes[4] == 0) | (sizes[4] >= 4)).all(), sizes[4]
    assert ((sizes[4] > 0) == (sizes[0] > 0)).all()  # the floor lifts, it does not empty
    capsys.readouterr()
    # --keep-heads: no head goes outright (the ratio alone removes some), with the floor under the revived ones too
    heads = {}
    for extra in ([], ["--keep-heads"]):
        out = tmp_path / f"h{len(extra)}.safetensors"
        assert main(["prune", *common, "--prune-ratio", "0.97", "--min-units", "4", *extra, "-o", str(out)]) == 0
        pruned = far.load(out)
        heads[bool(extra)] = torch.cat([m.hidden_sizes.sum(0) for _, m in far.far_modules(pruned)])
        assert pruned.far_checkpoint["metadata"]["pruning"]["keep_heads"] is bool(extra)
        assert ("no head removed" in capsys.readouterr().out) is bool(extra)
    assert (heads[False] == 0).any() and (heads[True] >= 4).all(), heads
    for extra, match in ((["--min-units", "-1"], "--min-units must be an int >= 0"),
                         (["--min-units", "6", "--budget", "mixer-params=30k", "--align", "arrays"], "multiple of --align (4 units)")):
        code = main(["prune", *common, *extra, "-o", str(tmp_path / "never.safetensors")])
        err = capsys.readouterr().err
        assert code == 2 and match in err, (extra, err)
        assert not (tmp_path / "never.safetensors").exists()


def test_min_units_above_every_head_is_refused():
    """A floor above every (head, direction)'s units would leave each all or nothing (a ratio then prunes next
    to nothing): refused, naming the largest; up to the largest size is allowed, even above some heads' sizes."""
    from far.errors import ConfigError
    from far.methods.prune import check_min_units

    mods = [block(0, hidden_sizes=[[8, 24], [16, 4]]), block(1, hidden_sizes=[[6, 6], [6, 6]])]
    for ok in (0, 1, 4, 16, 24):
        check_min_units(ok, models=mods)
    with pytest.raises(ConfigError, match=r"min_units \(25\) exceeds .*the largest has 24"):
        check_min_units(25, models=mods)
    check_min_units(25)  # without the blocks only the number itself is checked
    model = far.create_model("fmnist_deit_tiny", embed_dim=48, depth=2, num_heads=2)  # 24 units per (head, direction)
    with pytest.raises(ConfigError, match="the largest has 24"):
        far.prune(model, None, min_units=100)  # before any training (no data needed)
    with pytest.raises(ConfigError, match="the largest has 24"):
        far.prune(model, None, budget="mixer-params=30k", min_units=28, align=4)


def test_prune_command_refuses_a_floor_above_every_head_and_a_repeated_budget(tmp_path, capsys):
    from far.cli import main

    torch.manual_seed(0)
    far.save(far.create_model("fmnist_deit_tiny", embed_dim=48, depth=2, num_heads=2), tmp_path / "s.safetensors")
    common = [str(tmp_path / "s.safetensors"), "--limit", "32", "--eval-limit", "32", "--batch-size", "32",
              "--epochs", "0", "--finetune-epochs", "0", "-q", "-o", str(tmp_path / "never.safetensors")]
    for extra, match in ((["--min-units", "100"], "far: error: min_units (100) exceeds the units of every (head, "
                                                  "direction) (the largest has 24)"),
                         (["--min-units", "25"], "the largest has 24"),
                         (["--budget", "mixer-params=200k", "--budget", "params=500k"],
                          "argument --budget: given twice (mixer-params=200k and params=500k)")):
        code = main(["prune", *common, *extra])
        err = capsys.readouterr().err
        assert code == 2 and match in err, (extra, err)
        assert not (tmp_path / "never.safetensors").exists()


def _zero_units(m, units):
    """Zero every entry of the groups of `units` [(head, direction, unit)]: their norms are exactly 0 (ties)."""
    n = m.width
    with torch.no_grad():
        for h, r, u in units:
            rows = [q * n + u for q in range(4)]
            m.w_ih[h, r, rows] = 0
            m.w_hh[h, r, rows] = 0
            m.w_hh[h, r, :, u] = 0
            m.b_ih[h, r, rows] = 0
            m.b_hh[h, r, rows] = 0
            m.head_proj_weight[h, :, r * n + u] = 0


@pytest.mark.parametrize("ratio,pruned", [(0.25, 12), (0.21875, 12), (0.1875, 0), (0.125, 0), (0.5, 16)])
def test_global_threshold_moves_a_run_of_equal_norms_as_one(ratio, pruned):
    """12 of 32 groups are exactly zero: the threshold cannot split them, so they go together, pruned when that
    count is nearer k = round(ratio * 32) than keeping them (k = 8: 12, not 0 as a threshold of 0 gave), kept
    on a draw (k = 6)."""
    m = block(1, C=16)
    zeros = [(h, r, u) for h in range(2) for r in range(2) for u in range(3)]  # 12 groups
    _zero_units(m, zeros)
    norms = group_norms(m)
    assert int((norms == 0).sum()) == 12 and int((norms > 0).sum()) == 20
    keep = keep_masks([m], global_threshold([m], prune_ratio=ratio))[0]
    assert 32 - int(keep.sum()) == pruned
    assert bool(keep[norms > 0].all()) or pruned > 12  # what is pruned is always the weakest
    if pruned >= 12:
        assert not bool(keep[norms == 0].any())


def test_global_threshold_prunes_exactly_k_groups_of_a_bfloat16_model():
    """Norms of a bf16 block are bf16: the midpoint threshold between two neighbouring values must not be
    rounded to bf16 when it is compared (it then equals one of them and keeps or prunes one group too many)."""
    checked = 0
    for seed in range(20):
        torch.manual_seed(seed)
        m = far.FARAttention(16, 2).to(torch.bfloat16)
        s = group_norms(m).double().flatten().sort().values
        k = round(0.5 * s.numel())
        if s[k - 1] == s[k]:
            continue  # a tie at k: the test above
        checked += 1
        keep = keep_masks([m], global_threshold([m], prune_ratio=0.5))[0]
        assert s.numel() - int(keep.sum()) == k, seed
    assert checked >= 5


def test_prune_removes_round_ratio_times_groups_like_the_threshold_it_documents():
    """far.prune(prune_ratio=p) with one round removes k = round(p * #groups) groups, as global_threshold does.
    It used to pass 1 - (1 - p) ** (1 / rounds) instead of p, which float rounding moves off p: at p * G = x.5
    that flips round() (here 96 groups; e.g. p = 11 / 192: 6 instead of 5)."""
    from conftest import HalvesImages

    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", embed_dim=24, depth=2, num_heads=3).double().eval()
    G = sum(int(m.hidden_sizes.sum()) for _, m in far.far_modules(model))  # 2 blocks x 3 heads x 2 x 8 = 96
    norms = torch.cat([group_norms(m)[m.unit_mask()] for _, m in far.far_modules(model)]).sort().values
    assert (norms[1:] > norms[:-1]).all()  # no ties: every k is one threshold
    cfg = far.TrainConfig(epochs=0, batch_size=8, progress=False)
    data = HalvesImages(8)
    drifted = 0
    for x in range(G):
        p = (2 * x + 1) / (2 * G)  # p * G halfway between two counts: where a drift of one ulp decides
        drifted += round(p * G) != round((1 - (1 - p)) * G)
        pruned = far.prune(model, data, config=cfg, prune_ratio=p, finetune_epochs=0)
        assert G - sum(int(m.hidden_sizes.sum()) for _, m in far.far_modules(pruned)) == round(p * G), p
    assert drifted == 16  # the cases the old formula got wrong


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norms_of_a_low_precision_block_are_exact(dtype):
    """The norms the threshold ranks are those of the stored (bf16/fp16) weights, computed in float64: summed and
    rounded in the weights' own dtype, a d = 64 block's 384 norms fell on a few dozen values (hundreds of ties),
    so a ratio pruned whole runs of 'equal' groups and a budget's ranking followed unit positions, not norms."""
    import copy

    torch.manual_seed(0)
    m = far.FARAttention(192, 3).to(dtype)
    exact = group_norms(copy.deepcopy(m).double())  # the same weights, every operation in float64
    g = group_norms(m)
    assert g.dtype == torch.float64 and torch.equal(g, exact)
    s = g.flatten().sort().values
    assert (s[1:] > s[:-1]).all()  # no ties among the exact norms here
    for ratio in (0.1, 0.3, 0.5, 0.9):
        keep = keep_masks([m], global_threshold([m], prune_ratio=ratio))[0]
        assert s.numel() - int(keep.sum()) == round(ratio * s.numel()), ratio


@pytest.mark.parametrize("tensor", ["w_ih", "w_hh", "b_hh", "head_proj_weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_unit(tensor, value, tmp_path):
    """A NaN compares false with every threshold and torch.sort ranks it strongest: a ratio or threshold silently
    removed the unit with the NaN while a budget kept it (and the NaN with it). Refused instead, naming the unit,
    by the threshold functions and by far.prune before any training, which writes nothing."""
    from far.errors import ConfigError
    from far.methods.prune import Budget, plan_budget

    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", embed_dim=16, depth=2, num_heads=2, hidden_sizes=4).double()
    (_, m0), (name, m) = far.far_modules(model)
    n = m.width
    with torch.no_grad():  # head 1, backward, unit 2 (W_hh: its row of gate f, its own column)
        if tensor == "head_proj_weight":
            m.head_proj_weight[1, 3, n + 2] = value
        else:
            getattr(m, tensor)[1, 1, n + 2, ...].view(-1)[2 if tensor == "w_hh" else 0] = value
    where = r"head 1, backward unit 2 has a non-finite weight"
    with pytest.raises(ConfigError, match=where):
        global_threshold([m0, m], prune_ratio=0.3)
    with pytest.raises(ConfigError, match="FAR block 1: " + where):
        keep_masks([m0, m], 0.5)
    with pytest.raises(ConfigError, match=f"{name}: {where}"):
        plan_budget(far.far_modules(model), model, Budget.parse("mixer-params=3000"))
    cfg = far.TrainConfig(epochs=0, batch_size=8, progress=False, out_dir=str(tmp_path / "run"))
    for options in ({"prune_ratio": 0.3}, {"threshold": 1.0}, {"budget": "mixer-params=3000"}):
        with pytest.raises(ConfigError, match=f"{name}: {where}"):
            far.prune(model, list(range(8)), config=cfg, finetune_epochs=0, **options)
    assert not (tmp_path / "run").exists()


def test_public_groups_are_the_public_codes_concatenation():
    """groups="public" is the authors' group (modeling/train.py compute_lstm_reg_multihead): per unit the
    concatenation [its W_ih rows over the 4 gates, its W_hh column, its W_hh rows over the 4 gates], so W_hh's 4
    diagonal entries of the unit count twice; it used to count them once, as groups="far" does."""
    m = block(5, C=16)
    with torch.no_grad():
        m.w_hh.mul_(4)  # make the diagonal's share of a group large enough to matter
    n, d = m.width, m.head_dim
    pub = group_norms(m, "public")
    for h in range(2):
        for r in range(2):
            w_ih, w_hh = m.w_ih[h, r].detach(), m.w_hh[h, r].detach()
            for u in range(n):
                rows = [q * n + u for q in range(4)]
                group = torch.cat([w_ih[rows].flatten(), w_hh[:, u], w_hh[rows].flatten()])
                assert abs(float(pub[h, r, u]) - float(group.norm())) < 1e-12 * float(group.norm()), (h, r, u)
    diag = torch.stack([m.w_hh[:, :, q * n + torch.arange(n), torch.arange(n)] for q in range(4)]).detach()
    extras = (m.b_ih.detach().view(2, 2, 4, n).square().sum(2) + m.b_hh.detach().view(2, 2, 4, n).square().sum(2)
              + m.head_proj_weight.detach().view(2, d, 2, n).square().sum(1))
    far_minus_extras = group_norms(m, "far").square() - extras
    assert torch.allclose(pub.square() - far_minus_extras, diag.square().sum(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("run,pruned", [(1, 10), (3, 11)])
def test_global_threshold_between_norms_one_ulp_apart(run, pruned):
    """The threshold between two norms was their float64 midpoint; for adjacent doubles that rounds to the lower
    one, which is then kept (groups >= threshold are): too few pruned. Every group here has one nonzero weight, so
    its norm is that weight exactly: norms 1..32, k = 10. run 1: the 10th norm is 10.0 and the 11th one ulp above
    (10 pruned, not 9). run 3: the 9th-11th are 10.0, a run of equal norms pruned whole (11 is nearer k than 8),
    and the 12th one ulp above (11 pruned, not 8)."""
    import math

    m = far.FARAttention(16, 2).double()  # 2 heads x 2 directions x 8 units = 32 groups
    n = m.width
    vals = [float(v) for v in range(1, 33)]
    first = 9 if run == 1 else 8
    vals[first:first + run] = [10.0] * run
    vals[first + run] = math.nextafter(10.0, 11.0)
    with torch.no_grad():
        for p in (m.w_ih, m.w_hh, m.b_ih, m.b_hh, m.head_proj_weight):
            p.zero_()
        for i, v in enumerate(vals):
            m.w_ih[i // (2 * n), (i // n) % 2, i % n, 0] = v
    g = group_norms(m)
    assert sorted(g.flatten().tolist()) == sorted(vals)
    keep = keep_masks([m], global_threshold([m], prune_ratio=10 / 32))[0]
    assert 32 - int(keep.sum()) == pruned
    assert torch.equal(keep, g > 10.0)

"""Attention reuse (TReX-style): the module's forward by hand, plans and their errors, checkpoints, the
latency-budget search, the least-squares warm start and the method end to end."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F

import far
from conftest import RandomImages
from far.cli import main
from far.errors import ConfigError
from far.imc.cost import model_cost
from far.methods.reuse import attention_similarity, fit_transforms, search_reuse
from far.nn import apply_reuse, reuse_plan


def tiny(depth=3, seed=0):
    torch.manual_seed(seed)
    return far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=depth, num_heads=2).eval()


def test_reuse_forward_by_hand():
    m = tiny()
    teacher = copy.deepcopy(m)
    apply_reuse(m, {2: 0})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        b0 = teacher.blocks[0]
        a0 = b0.attn(b0.norm1(h))  # block 0's attention output: what block 2 reuses
        h = teacher.blocks[1](teacher.blocks[0](h))
        b2 = m.blocks[2]
        h = h + b2.attn.transform(a0)
        h = h + b2.mlp(b2.norm2(h))
        want = m.head(m.fc_norm(m.norm(h)[:, 0]))
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    assert reuse_plan(m) == {2: 0} and not hasattr(m.blocks[2].attn, "qkv")


def _vit64(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=8, in_chans=1, num_classes=3, embed_dim=16, depth=3, num_heads=2,
                          **kw).double().eval()
    with torch.no_grad():
        for p in m.parameters():  # off timm's init (LayerScale 1e-5, LayerNorm 1 / 0): every parameter matters
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kw", [{}, dict(init_values=0.5), dict(qk_norm=True), dict(reg_tokens=2),
                                dict(scale_attn_norm=True)],
                         ids=["plain", "layerscale", "qk_norm", "reg", "scale_norm"])
def test_reused_block_is_the_transform_of_the_source_output_exactly(kw):
    """float64: block 2 = x + ls1(transform(block 0's attention output, before block 0's LayerScale)) + its MLP, with
    the timm variants apply_reuse accepts; the source block itself is unchanged (its tap applies its LayerScale)."""
    teacher = _vit64(**kw)
    m = apply_reuse(copy.deepcopy(teacher), {2: 0})
    with torch.no_grad():
        for p in m.blocks[2].attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
        h = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(x)))
        b0 = teacher.blocks[0]
        a0 = b0.attn(b0.norm1(h))
        h = teacher.blocks[1](teacher.blocks[0](h))
        b2 = m.blocks[2]
        h = h + b2.ls1(b2.attn.transform(a0))
        h = h + b2.ls2(b2.mlp(b2.norm2(h)))
        assert torch.equal(m(x), m.forward_head(m.norm(h)))


@pytest.mark.parametrize("block", ["ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock"])
def test_blocks_other_than_the_pre_norm_block_are_refused(block):
    """The tap and ReuseAttention assume x + ls1(attn(norm1(x))): other timm blocks were an AttributeError
    ('no ls1')."""
    import timm.models.vision_transformer as vt

    m = _vit64(block_fn=getattr(vt, block))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=f"blocks.0: {block} cannot take part in attention reuse"):
        apply_reuse(m, {2: 0})
    assert not reuse_plan(m) and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_bad_plans():
    for plan, msg in (({1: 2}, "earlier block"), ({0: 0}, "earlier block"), ({1: 0, 2: 1}, "keep its own attention"),
                      ({5: 0}, "earlier block")):
        with pytest.raises(ValueError, match=msg):
            apply_reuse(tiny(), plan)


def test_checkpoint_round_trip_and_copies(tmp_path):
    m = apply_reuse(tiny(), {1: 0, 2: 0}, kind="ln-linear")
    for p in m.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    far.save(m, tmp_path / "r.safetensors")
    cfg = far.read_config(tmp_path / "r.safetensors")
    assert cfg["reuse"] == {"plan": {"1": 0, "2": 0}, "transform": "ln-linear"}
    back = far.load(tmp_path / "r.safetensors")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), back(x))
        c = copy.deepcopy(back)  # a copy has its own store: both still run, and agree
        assert torch.equal(c(x), back(x)) and c.far_reuse_store is not back.far_reuse_store
    assert reuse_plan(back) == {1: 0, 2: 0}


def test_search_meets_the_budget_most_similar_first():
    m = tiny(depth=4)
    data = RandomImages(32, seed=1)
    sim = attention_similarity(m, data)
    assert sim.shape == (4, 4) and torch.allclose(sim, sim.T) and torch.all(sim.diagonal() == 1)
    base = model_cost(m).totals["latency_us"]
    res = search_reuse(m, data, latency_budget_us=base * 0.9, similarity=sim)
    assert res["met"] and res["latency_us"] <= base * 0.9 and res["baseline_latency_us"] == pytest.approx(base)
    best = max(((float(sim[a, b]), a, b) for a in range(1, 4) for b in range(a)))
    assert (best[1], best[2]) in res["plan"].items()
    impossible = search_reuse(m, data, latency_budget_us=1.0, similarity=sim)
    assert not impossible["met"] and impossible["plan"]


def test_similarity_uses_at_most_limit_images():
    """limit=10 with batches of 16 measured all 16 images of the first batch."""
    m, data = tiny(), RandomImages(40, seed=3)
    first = torch.utils.data.Subset(data, range(10))
    # the same 10 images in one batch of 10 either way: the same arithmetic, bit for bit
    assert torch.equal(attention_similarity(m, data, batch_size=16, limit=10),
                       attention_similarity(m, first, batch_size=16))


def test_search_refuses_a_similarity_of_the_wrong_size_or_with_nan():
    """A [2, 2] similarity for 4 blocks kept blocks 2 and 3 out of the search (plan {1: 0}, budget missed, no word);
    a NaN pair seen first won over every real one (nothing compares greater than NaN)."""
    m = tiny(depth=4)
    budget = model_cost(m).totals["latency_us"] * 0.9
    with pytest.raises(ConfigError, match=r"similarity must be \[4, 4\].*got \[2, 2\]"):
        search_reuse(m, None, latency_budget_us=budget, similarity=torch.eye(2, dtype=torch.float64))
    sim = torch.eye(4, dtype=torch.float64)
    sim[1, 0] = sim[0, 1] = float("nan")
    sim[3, 2] = sim[2, 3] = 0.9
    with pytest.raises(ConfigError, match="NaN or inf"):
        search_reuse(m, None, latency_budget_us=budget, similarity=sim)
    sim[1, 0] = sim[0, 1] = 0.1
    assert search_reuse(m, None, latency_budget_us=budget, similarity=sim)["plan"] == {3: 2}


def test_unreachable_latency_budget_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """search_reuse reports met=False; far.reuse and far reuse refuse it before any training, with the least
    latency reuse reaches (every later block reusing block 0). A budget some plan meets is met: the greedy search
    skips a pair that would leave too few blocks to reuse (it was refused, 'give it --plan 1:0,2:0')."""
    teacher = tiny()
    data = RandomImages(32, seed=5)
    cfg = far.TrainConfig(epochs=1, batch_size=16, progress=False, augment=False)
    lowest = model_cost(apply_reuse(copy.deepcopy(teacher), {1: 0, 2: 0})).totals["latency_us"]

    def no_training(*a, **k):
        raise AssertionError("trained despite an unmet budget")

    reuse_module = sys.modules["far.methods.reuse"]  # far.methods.reuse is also the function's name
    monkeypatch.setattr(reuse_module, "fit_transforms", no_training)
    monkeypatch.setattr(reuse_module, "train", no_training)
    with pytest.raises(ConfigError, match=rf"cannot be met.*smallest latency reachable by reuse is {lowest:.1f} us"):
        far.reuse(teacher, data, latency_budget_us=10.0, config=cfg)
    # blocks 2 and 1 most alike: 2 <- 1 would end the search at one reuser; the budget needs two (1 <- 0, 2 <- 0)
    sim = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.9], [0.1, 0.9, 1.0]], dtype=torch.float64)
    one = model_cost(apply_reuse(copy.deepcopy(teacher), {2: 1})).totals["latency_us"]
    assert lowest < one
    res = search_reuse(teacher, data, latency_budget_us=(lowest + one) / 2, similarity=sim)
    assert res["met"] and res["plan"] == {1: 0, 2: 0} and res["latency_us"] == pytest.approx(lowest)
    # with a budget one reuser meets, the most similar pair is still taken
    assert search_reuse(teacher, data, latency_budget_us=one, similarity=sim)["plan"] == {2: 1}
    tpath, out = tmp_path / "t.safetensors", tmp_path / "trex.safetensors"
    far.save(teacher, tpath)
    common = ["--epochs", "0.5", "--limit", "32", "--eval-limit", "16", "--batch-size", "16", "--out-dir",
              str(tmp_path / "run"), "-q", "-o", str(out)]
    assert main(["reuse", str(tpath), "--latency-budget", "10", *common]) == 2
    assert "far: error: the latency budget 10.0 us cannot be met" in capsys.readouterr().err
    assert main(["reuse", str(tpath), "--plan", "2:1,2:0", *common]) == 2
    assert "--plan lists block 2 twice" in capsys.readouterr().err
    assert main(["reuse", str(tpath), "--plan", "", *common]) == 2  # was: "give exactly one of plan= and ..."
    assert "far: error: --plan takes BLOCK:SOURCE pairs like 2:1,3:1, got ''" in capsys.readouterr().err
    assert not out.exists()


def test_least_squares_start_fits_the_replaced_attention():
    teacher = tiny()
    data = RandomImages(64, seed=2)
    student = apply_reuse(copy.deepcopy(teacher), {2: 1}, kind="ln-linear")
    x = data.x[:16]
    with torch.no_grad(), far.nn.MixerTaps(teacher, inputs=False, pre_proj=False, outputs=True) as taps:
        teacher(x)
        outs = taps.take()[2]
        before = F.mse_loss(student.blocks[2].attn.transform(outs[1]), outs[2])
        fit_transforms(student, teacher, data)
        after = F.mse_loss(student.blocks[2].attn.transform(outs[1]), outs[2])
    assert after < 0.5 * before


def test_ridge_start_is_the_normal_equations_solution_centred():
    """fit_transforms(ridge=a) solves (G + a*mean(diag G)*I') w = A^T b (G = A^T A, A = [LN(source), 1], the
    bias unpenalized), then centres each weight row (no component along the LayerNorm's null direction 1/g)."""
    teacher = tiny()
    data = RandomImages(32, seed=3)
    student = apply_reuse(copy.deepcopy(teacher), {2: 1}, kind="ln-linear")
    tr = student.blocks[2].attn.transform
    with torch.no_grad(), far.nn.MixerTaps(teacher, inputs=False, pre_proj=False, outputs=True) as taps:
        teacher(data.x)
        outs = taps.take()[2]
        a = tr.norm(outs[1]).flatten(0, 1).double()
        b = outs[2].flatten(0, 1).double()
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    gram = a1.T @ a1
    pen = torch.diag(torch.cat([torch.full((32,), 0.01 * float(torch.diagonal(gram)[:32].mean())),
                                torch.zeros(1)])).double()
    sol = torch.linalg.solve(gram + pen, a1.T @ b)
    fit_transforms(student, teacher, data, ridge=0.01)
    w = tr.linear.weight.detach().double()
    assert float((w @ torch.ones(32, dtype=w.dtype)).abs().max()) < 1e-5 * float(w.abs().max())  # centred (g = 1)
    with torch.no_grad():  # the centring changed no output: the fit's predictions are the solution's
        got = tr.linear(a.float()).double()
    torch.testing.assert_close(got, a1 @ sol, atol=1e-4 * float(b.abs().max()), rtol=0)
    small = w.abs().max()
    fit_transforms(student, teacher, data, ridge=0.0)  # plain least squares: larger weights, closer fit
    assert tr.linear.weight.abs().max() > small
    with pytest.raises(ConfigError, match="ridge must be >= 0"):
        fit_transforms(student, teacher, data, ridge=-1)


def test_centring_keeps_the_function_and_removes_the_cancelling_component():
    torch.manual_seed(0)
    tr = far.nn.reuse.Transform(16, "ln-linear")
    with torch.no_grad():
        tr.norm.weight.uniform_(0.5, 2.0)
        tr.norm.bias.normal_()
        g = 1.0 / tr.norm.weight
        tr.linear.weight.add_(1000.0 * torch.randn(16, 1) * g)  # weights that cancel only in exact arithmetic
        x = torch.randn(5, 7, 16)
        before = tr(x).double()
        removed = tr.center_()
        after = tr(x).double()
    assert removed > 1000.0
    assert float((tr.linear.weight.detach() @ g).abs().max()) < 1e-3
    assert tr.linear.weight.abs().max() < 5.0
    torch.testing.assert_close(after, before, atol=2e-3, rtol=0)  # fp32 sums of ~1e3-sized terms before
    with torch.no_grad():
        tr.norm.weight[3] = 0.0
    assert tr.center_() == 0.0  # a zero LayerNorm gain: no single null direction, left as it is


def test_reuse_method_and_command(tmp_path, capsys):
    teacher = tiny()
    data, test = RandomImages(48, seed=3), RandomImages(16, seed=4)
    cfg = far.TrainConfig(epochs=1, batch_size=16, progress=False, augment=False)
    m = far.reuse(teacher, data, plan={2: 1}, eval_data=test, config=cfg, stage2_epochs=0.5)
    assert reuse_plan(m) == {2: 1} and not reuse_plan(teacher)
    rec = m.far_metadata["reuse"]
    assert rec["plan"] == {"2": 1} and rec["latency_us"] < model_cost(teacher).totals["latency_us"]
    keys = {k for r in m.far_run.history for k in r}
    assert {"mse_b2", "cos_b2", "kd"} <= keys
    with pytest.raises(ConfigError, match="exactly one"):
        far.reuse(teacher, data, config=cfg)
    with pytest.raises(ConfigError, match="already meets"):
        far.reuse(teacher, data, latency_budget_us=1e9, config=cfg)
    tpath, out = tmp_path / "t.safetensors", tmp_path / "trex.safetensors"
    far.save(teacher, tpath)
    assert main(["reuse", str(tpath), "--plan", "2:1", "--epochs", "0.5", "--stage2-epochs", "0.5", "--limit", "64",
                 "--eval-limit", "32", "--batch-size", "32", "--out-dir", str(tmp_path / "run"), "-q", "-o", str(out)]) == 0
    assert "reusing blocks" in capsys.readouterr().out
    assert reuse_plan(far.load(out)) == {2: 1}
    assert main(["imc-cost", str(tpath), str(out), "--dynamic", "write", "-q"]) == 0
    text = capsys.readouterr().out
    assert "reuse" in text and "attention" in text


def test_pickled_model_carries_no_activation_of_a_past_batch():
    """torch.save(model) after a forward pass: the store's last source output (the user's data, B x N x C per
    source) must not be written with the model; the unpickled model still runs and agrees."""
    import io

    m = apply_reuse(tiny(), {2: 0})
    x = torch.randn(64, 1, 28, 28)
    buf = io.BytesIO()
    torch.save(m, buf)
    before = len(buf.getvalue())
    with torch.no_grad():
        y = m(x)
    assert 0 in m.far_reuse_store.outputs  # the forward pass did record it
    buf = io.BytesIO()
    torch.save(m, buf)
    assert len(buf.getvalue()) == before
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert back.far_reuse_store.outputs == {}
    assert back.blocks[2].attn.store is back.far_reuse_store is back.blocks[0].ls1.store
    with torch.no_grad():
        assert torch.equal(back(x), y)

"""far.analysis: every number checked by hand on tiny cases (tiny timm ViTs, far.convert, no training)."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, VisionTransformer

import far
from far.analysis import (analyze, attention_maps, format_analysis, format_json, jacobian_maps, map_similarity,
                          plot_analysis, pre_proj_output, replaced, row_normalize, save_maps)
from far.errors import ConfigError
from far.fidelity import BlockStats
from far.nn import FARAttention


def tiny_vit(seed=0, depth=2):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, in_chans=1, num_classes=5, embed_dim=12, depth=depth,
                             num_heads=3, mlp_ratio=2.0).eval()


def tiny_data(n=6, seed=1, labels=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 5, (n,), generator=g) if labels else torch.full((n,), -1)
    return torch.utils.data.TensorDataset(x, y)


class TeacherFunctionFAR(FARAttention):
    """A FAR block whose token_mix is `factor` times the teacher attention's output before W_O."""

    def __init__(self, attn: Attention, factor: float = 1.0):
        super().__init__(attn.proj.in_features, num_heads=attn.num_heads)
        self.attn, self.factor = attn, factor
        self.proj.load_state_dict(attn.proj.state_dict())

    def token_mix(self, x, backend=None):
        return self.factor * pre_proj_output(self.attn, x)


def student_of(teacher, factor=1.0):
    student = copy.deepcopy(teacher)
    for blk in student.blocks:
        blk.attn = TeacherFunctionFAR(copy.deepcopy(blk.attn), factor)
    return student


# ---- per-block metrics ----
def test_block_metrics_by_hand():
    """t = [[1, 0], [0, 1]], s = [[2, 0], [1, 1]] (tokens x channels): the two cosines differ."""
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    s = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    st = BlockStats()
    st.add(s, t)
    r = st.result()
    # along tokens, per channel: channel 0 (1, 0).(2, 1) = 2/sqrt(5); channel 1 (0, 1).(0, 1) = 1
    assert r["cos"] == pytest.approx((2 / math.sqrt(5) + 1) / 2, abs=1e-12)
    # along channels, per token: token 0 (1, 0).(2, 0) = 1; token 1 (0, 1).(1, 1) = 1/sqrt(2)
    assert r["token_cos"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-12)
    assert r["rel_mse"] == pytest.approx(2 / 2, abs=1e-12)  # (s - t)^2 = 1 + 1, t^2 = 2
    assert r["scale"] == pytest.approx(math.sqrt(6 / 2), abs=1e-12)  # ||s||^2 = 4 + 1 + 1


def test_head_cos_by_hand():
    """Two heads of two channels each, two tokens: head 0 reproduced exactly, head 1's first channel negated
    and its second orthogonal, so head_cos = [1, (-1 + 0) / 2] and cos is their mean."""
    t = torch.tensor([[[1.0, 2.0, 1.0, 1.0], [3.0, 1.0, 2.0, -1.0]]])
    s = torch.tensor([[[1.0, 2.0, -1.0, 1.0], [3.0, 1.0, -2.0, 1.0]]])
    st = BlockStats(heads=2)
    st.add(s, t)
    st.add(s, t)  # a second batch: the per-head figures are means over images, not sums
    r = st.result()
    assert r["head_cos"] == pytest.approx([1.0, -0.5], abs=1e-12)
    assert r["cos"] == pytest.approx(sum(r["head_cos"]) / 2, abs=1e-12)
    assert BlockStats().result()["head_cos"] == [0.0]  # nothing added yet
    with pytest.raises(ConfigError, match="multiple of 3"):
        BlockStats(heads=3).add(s, t)
    with pytest.raises(ConfigError, match="one shape"):
        st.add(s, t[:, :1])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="heads must be"):
            BlockStats(heads=bad)


class OneHeadWrong(TeacherFunctionFAR):
    """The teacher attention's output before W_O with head `head`'s channels negated."""

    def __init__(self, attn, head):
        super().__init__(attn)
        self.head = head

    def token_mix(self, x, backend=None):
        out = super().token_mix(x).clone()
        d = out.shape[-1] // self.num_heads
        out[..., self.head * d:(self.head + 1) * d] *= -1
        return out


def test_head_cos_finds_the_wrong_head(tmp_path, monkeypatch):
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    student.blocks[1].attn = OneHeadWrong(copy.deepcopy(teacher.blocks[1].attn), head=2)
    r = analyze(teacher, student, tiny_data(), batch_size=4, map_images=0)
    iso = r["blocks"][1]["isolated"]
    assert iso["head_cos"] == pytest.approx([1, 1, -1], abs=1e-6) and iso["cos"] == pytest.approx(1 / 3, abs=1e-6)
    assert r["blocks"][0]["isolated"] is None and r["blocks"][0]["in_model"]["head_cos"] == pytest.approx([1] * 3)
    assert "block 0 (in model) 1.000 1.000 1.000 | block 1 1.000 1.000 -1.000" in format_analysis(r)
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    shown = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):  # what the per-block plot shows, read as it is saved
        ax = fig.axes[0]
        shown.setdefault("ylim", ax.get_ylim())
        shown.setdefault("dots", [list(line.get_ydata()) for line in ax.get_lines() if line.get_marker() == "."])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    assert len(plot_analysis(r, tmp_path / "new")) == 2
    assert shown["dots"] == [pytest.approx([1, 1, -1], abs=1e-6)] and shown["ylim"][0] < -1  # the wrong head shows
    for blk in r["blocks"]:  # a report written before head_cos existed still plots, without the dots
        for kind in ("isolated", "in_model"):
            if blk[kind]:
                del blk[kind]["head_cos"]
    assert len(plot_analysis(r, tmp_path / "old")) == 2


def test_student_equal_to_the_teacher_function():
    teacher = tiny_vit()
    r = analyze(teacher, student_of(teacher), tiny_data(), batch_size=4, map_images=0)
    assert r["num_images"] == 6 and r["maps"] is None
    for blk in r["blocks"]:
        for kind in ("isolated", "in_model"):
            assert blk[kind]["cos"] == pytest.approx(1, abs=1e-6)
            assert blk[kind]["token_cos"] == pytest.approx(1, abs=1e-6)
            assert blk[kind]["rel_mse"] == pytest.approx(0, abs=1e-10)
            assert blk[kind]["scale"] == pytest.approx(1, abs=1e-6)
    assert r["full_student"]["feature_cos"] == pytest.approx(1, abs=1e-6) and r["full_student"]["agreement"] == 1
    for part in ("mixer", "block"):
        assert [p["replaced"] for p in r["partial"][part]] == [1, 2]
        for p in r["partial"][part]:
            assert p["feature_cos"] == pytest.approx(1, abs=1e-6) and p["agreement"] == 1
    assert r["outside_mixers"]["tensors_differing"] == 0


def test_student_scaled_by_two():
    teacher = tiny_vit()
    r = analyze(teacher, student_of(teacher, 2.0), tiny_data(), batch_size=6, map_images=0)
    iso = r["blocks"][0]["isolated"]
    assert iso["cos"] == pytest.approx(1, abs=1e-6) and iso["token_cos"] == pytest.approx(1, abs=1e-6)
    assert iso["scale"] == pytest.approx(2, rel=1e-6)
    assert iso["rel_mse"] == pytest.approx(1, rel=1e-6)  # ||2t - t||^2 / ||t||^2


# ---- partial replacement ----
def manual_features(teacher, student, x, k, part):
    """The hybrid composed by hand: timm's Block is x + attn(norm1(x)), then x + mlp(norm2(x))."""
    h = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(x)))
    for i, blk in enumerate(teacher.blocks):
        if i <= k and part == "block":
            blk = student.blocks[i]
        attn = student.blocks[i].attn if i <= k else blk.attn
        h = h + attn(blk.norm1(h))
        h = h + blk.mlp(blk.norm2(h))
    feat = teacher.fc_norm(teacher.norm(h)[:, 0])
    return feat, teacher.head(feat)


@pytest.mark.parametrize("part", ["mixer", "block"])
def test_partial_replacement_is_the_manual_composition(part):
    teacher = tiny_vit(depth=3)
    student = far.convert(copy.deepcopy(teacher))
    with torch.no_grad():  # make the student's MLPs differ, as after stage 2, so the two parts differ
        for blk in student.blocks:
            blk.mlp.fc1.weight.mul_(1.5)
    data = tiny_data(n=5)
    x, y = data.tensors
    r = analyze(teacher, student, data, batch_size=2, map_images=0)
    with torch.no_grad():
        t_feat = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
        t_pred = teacher(x).argmax(-1)
        for k in range(3):
            feat, logits = manual_features(teacher, student, x, k, part)
            with replaced(teacher, student, range(k + 1), part):
                torch.testing.assert_close(teacher(x), logits, rtol=1e-5, atol=1e-5)
            cos = float(nn.functional.cosine_similarity(feat.double(), t_feat.double(), dim=-1).mean())
            row = r["partial"][part][k]
            assert row["feature_cos"] == pytest.approx(cos, abs=1e-5)
            assert row["agreement"] == float((logits.argmax(-1) == t_pred).double().mean())
            assert row["accuracy"] == float((logits.argmax(-1) == y).double().mean())
        s_feat = student.forward_head(student.forward_features(x), pre_logits=True)
    assert r["full_student"]["feature_cos"] == pytest.approx(
        float(nn.functional.cosine_similarity(s_feat, t_feat, dim=-1).mean()), abs=1e-5)
    if part == "block":  # whole blocks 0..L-1 replaced = the student up to its (unchanged) embedding and head
        assert r["partial"]["block"][-1]["feature_cos"] == pytest.approx(r["full_student"]["feature_cos"], abs=1e-5)
    assert r["outside_mixers"]["tensors_differing"] == 3
    assert r["outside_mixers"]["max_abs_diff"] > 0
    assert teacher(x).shape == (5, 5)  # the hooks are gone: no error, the teacher is itself again
    for m in teacher.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_unlabelled_data_has_no_accuracy():
    teacher = tiny_vit()
    r = analyze(teacher, far.convert(copy.deepcopy(teacher)), tiny_data(labels=False), map_images=0)
    assert r["teacher_accuracy"] is None and r["full_student"]["accuracy"] is None
    assert all(p["accuracy"] is None for p in r["partial"]["mixer"])
    assert "accuracy" not in format_analysis(r).split("full student")[1].split("\n")[0]


def test_models_on_another_device_than_the_images_are_a_clear_error():
    """block_fidelity moves the batches, never the models: a model elsewhere is named (meta stands in for a GPU)."""
    from far.fidelity import block_fidelity

    teacher = tiny_vit()
    student = far.convert(copy.deepcopy(teacher))
    with pytest.raises(ConfigError, match="the teacher is on meta but the images go to cpu"):
        block_fidelity(copy.deepcopy(teacher).to("meta"), student, tiny_data())
    with pytest.raises(ConfigError, match="the student is on meta but the images go to cpu"):
        block_fidelity(teacher, student.to("meta"), tiny_data(), device="cpu")


# ---- token maps ----
def test_attention_map_is_the_softmax_by_hand():
    attn = Attention(dim=2, num_heads=1, qkv_bias=False).eval()
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat([torch.eye(2)] * 3))  # q = k = v = x
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    a = attention_maps(attn, x)[0, 0]
    s = 1 / math.sqrt(2)  # head_dim 2

    def softmax_row(scores):
        e = [math.exp(v * s) for v in scores]
        return [v / sum(e) for v in e]

    # x_i . x_j: rows [1, 0, 1], [0, 1, 1], [1, 1, 2]
    want = torch.tensor([softmax_row([1, 0, 1]), softmax_row([0, 1, 1]), softmax_row([1, 1, 2])])
    torch.testing.assert_close(a, want, rtol=1e-6, atol=1e-7)


class LinearTokenMixer(nn.Module):
    """A FAR-like token mixer replaced by a fixed linear map over tokens: o[i] = sum_j M[i, j] x[j]."""

    def __init__(self, m: torch.Tensor, dim: int):
        super().__init__()
        self.m = m
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(torch.einsum("ij,bjc->bic", self.m, x))


def test_jacobian_of_a_linear_token_mixer(monkeypatch):
    m = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [3.0, 0.0, 1.0]])
    mixer = LinearTokenMixer(m, dim=4)
    x = torch.randn(2, 3, 4)
    j = jacobian_maps(mixer, x, num_heads=2, rows_per_pass=5)  # chunks that split images and rows
    # d o_{i, head h} / d x_j = M[i, j] * (the 2 x 4 rows of the identity of head h): Frobenius |M[i, j]| sqrt(2)
    want = (m.abs() * math.sqrt(2)).expand(2, 2, 3, 3)
    torch.testing.assert_close(j, want, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(far.analysis, "MAX_PASS_ELEMENTS", 3 * 4 * 2)  # two copies a pass: one row per image
    torch.testing.assert_close(jacobian_maps(mixer, x, num_heads=2), want, rtol=1e-6, atol=1e-6)
    norm = row_normalize(j)[0, 0]
    torch.testing.assert_close(norm, torch.tensor([[1 / 3, 2 / 3, 0], [0, 0.5, 0.5], [0.75, 0, 0.25]]))


def test_jacobian_of_attention_with_uniform_probabilities():
    """Zero q/k weights: A = 1/T everywhere and o_i = mean_j V x_j, so d o_{i,h} / d x_j = W_v[h] / T."""
    attn = Attention(dim=4, num_heads=2, qkv_bias=False).eval()
    with torch.no_grad():
        attn.qkv.weight[:8].zero_()
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(attention_maps(attn, x), torch.full((3, 2, 5, 5), 0.2))
    wv = attn.qkv.weight[8:].detach()
    want = torch.stack([wv[:2].norm(), wv[2:].norm()]) / 5
    j = jacobian_maps(attn, x, num_heads=2)
    torch.testing.assert_close(j, want.view(1, 2, 1, 1).expand(3, 2, 5, 5), rtol=1e-5, atol=1e-6)


def test_jacobian_of_far_block_matches_autograd():
    torch.manual_seed(3)
    mixer = FARAttention(6, num_heads=2, hidden_sizes=[[3, 2], [1, 3]]).double()
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    full = torch.autograd.functional.jacobian(lambda v: mixer.token_mix(v)[0], x)[:, :, 0]  # [T, 6, T, 6]
    want = torch.stack([full[:, 3 * h:3 * h + 3].square().sum((1, 3)).sqrt() for h in range(2)])
    torch.testing.assert_close(jacobian_maps(mixer, x, 2, rows_per_pass=7)[0], want)


def test_map_similarity_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    s = map_similarity(a, b)
    assert s["row_cos"] == pytest.approx((0 + 1) / 2)
    # flattened minus the mean 0.5: (0.5, -0.5, 0, 0) and (-0.5, 0.5, 0, 0): correlation -1
    assert s["pearson"] == pytest.approx(-1)
    assert map_similarity(a, torch.ones(2, 2))["pearson"] == 0.0


def test_maps_in_the_report_and_outputs(tmp_path):
    teacher = tiny_vit()
    student = far.convert(copy.deepcopy(teacher))
    r = analyze(teacher, student, tiny_data(n=5), batch_size=3, map_images=2)
    maps = r["maps"]
    assert (maps["images"], maps["tokens"], maps["heads"]) == (2, 5, 3)
    arrays = maps["arrays"]
    assert arrays["attention"].shape == (2, 2, 3, 5, 5)
    for key in arrays:  # probabilities / row-normalised: every row sums to 1
        np.testing.assert_allclose(arrays[key].sum(-1), 1, rtol=1e-5)
    # the score of block 1, head 2 recomputed from the arrays (image means)
    a, jf = arrays["attention"][1, :, 2].mean(0), arrays["jacobian_far"][1, :, 2].mean(0)
    rows = [float(np.dot(a[i], jf[i]) / np.linalg.norm(a[i]) / np.linalg.norm(jf[i])) for i in range(5)]
    assert maps["blocks"][1]["heads"][2]["attn_vs_far"]["row_cos"] == pytest.approx(np.mean(rows), abs=1e-5)
    assert maps["blocks"][1]["heads"][2]["attn_vs_far"]["pearson"] == pytest.approx(
        np.corrcoef(a.ravel(), jf.ravel())[0, 1], abs=1e-5)
    j = format_json(r)
    assert "arrays" not in j["maps"] and "arrays" in r["maps"]
    path = save_maps(r, tmp_path / "m.npz")
    with np.load(path) as z:
        np.testing.assert_array_equal(z["jacobian_far"], arrays["jacobian_far"])
    text = format_analysis(r)
    assert "A vs J(FAR)" in text and "partial replacement" in text
    pytest.importorskip("matplotlib")
    written = plot_analysis(r, tmp_path / "plots", image=1, head=2)
    assert [p.split("/")[-1] for p in written] == ["block_cosine.png", "error_accumulation.png", "token_maps.png"]
    assert all((tmp_path / "plots" / n).stat().st_size > 1000 for n in ("block_cosine.png", "token_maps.png"))
    with pytest.raises(ConfigError, match="heads 0..2"):
        plot_analysis(r, tmp_path / "plots", head=3)


def test_maps_cover_the_first_images_whatever_the_batch_size():
    """The token maps are of the first map_images images, collected across batches smaller than that (all of
    them when the data has fewer)."""
    teacher = tiny_vit()
    student = far.convert(copy.deepcopy(teacher))
    data = tiny_data(n=5)
    whole = analyze(teacher, student, data, batch_size=5, map_images=3)["maps"]
    for batch_size in (1, 2):
        maps = analyze(teacher, student, data, batch_size=batch_size, map_images=3)["maps"]
        assert maps["images"] == 3
        for key, arr in maps["arrays"].items():
            np.testing.assert_allclose(arr, whole["arrays"][key], rtol=1e-5, atol=1e-6)
        assert maps["blocks"][1]["heads"][2]["attn_vs_far"]["row_cos"] == pytest.approx(
            whole["blocks"][1]["heads"][2]["attn_vs_far"]["row_cos"], abs=1e-5)
    assert analyze(teacher, student, data, batch_size=2, map_images=9)["maps"]["images"] == 5


def test_bad_pairs_are_refused():
    teacher = tiny_vit()
    student = far.convert(copy.deepcopy(teacher))
    with pytest.raises(ConfigError, match="teacher has FAR blocks"):
        analyze(student, student, tiny_data())
    with pytest.raises(ConfigError, match="2 and 3 blocks"):
        analyze(teacher, far.convert(tiny_vit(depth=3)), tiny_data())
    with pytest.raises(ConfigError, match="part must be"):
        analyze(teacher, student, tiny_data(), parts=["mlp"])
    assert far.analyze is analyze


def test_nan_logits_agree_with_nothing_and_count_as_wrong():
    # argmax of a NaN row is a class: fidelity and analyze counted a diverged student as agreeing and correct
    from far.fidelity import block_fidelity

    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.head.bias.fill_(float("nan"))
    x = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        data = torch.utils.data.TensorDataset(x, teacher(x).argmax(-1))  # the teacher is right on every image
    with pytest.warns(UserWarning, match=r"student: 12 of 12 images gave non-finite"):
        fid = block_fidelity(teacher, student, data, batch_size=5)
    assert fid["agreement"] == 0 and fid["student_accuracy"] == 0 and fid["teacher_accuracy"] == 1
    assert fid["nonfinite"] == {"teacher": 0, "student": 12}
    with pytest.warns(UserWarning, match="non-finite"):
        report = analyze(teacher, student, data, batch_size=5, map_images=0, parts=("mixer",))
    assert report["full_student"]["agreement"] == 0 and report["full_student"]["accuracy"] == 0
    assert far.evaluate(teacher, data, batch_size=5)["accuracy"] == 1


def test_every_module_keeps_its_own_mode():
    # a model fine-tuning with frozen parts in eval mode: model.train(was) afterwards set them all to train
    from far.fidelity import block_fidelity
    from far.imc.cost import model_cost

    def frozen_parts(m):
        m.train()
        m.patch_embed.eval()
        m.blocks[0].eval()
        return m

    def modes(m):
        return [mod.training for mod in m.modules()]

    teacher = tiny_vit()
    data = tiny_data()
    for run in (lambda t, s: far.evaluate(s, data, batch_size=4),
                lambda t, s: block_fidelity(t, s, data, batch_size=4),
                lambda t, s: analyze(t, s, data, batch_size=4, map_images=0, parts=()),
                lambda t, s: model_cost(s, input_size=(1, 16, 16))):
        t, s = frozen_parts(copy.deepcopy(teacher)), frozen_parts(student_of(teacher))
        before = (modes(t), modes(s))
        assert not all(before[1]) and any(before[1])
        run(t, s)
        assert (modes(t), modes(s)) == before


def test_teacher_and_student_of_different_dtypes():
    # each model gets the images, and the student's blocks the teacher's activations, in its own dtype: a float64
    # (or bfloat16) student of a float32 teacher crashed in the teacher's patch embedding ("Input type ... bias type")
    from far.fidelity import block_fidelity
    from far.nn import MixerTaps

    teacher = tiny_vit(depth=2)
    student = far.convert(copy.deepcopy(teacher)).double()
    data = tiny_data(n=5)
    x, _ = data.tensors
    r = block_fidelity(teacher, student, data, batch_size=5)
    stats = [{k: BlockStats(3) for k in ("isolated", "in_model")} for _ in range(2)]
    with torch.no_grad(), MixerTaps(teacher) as t_taps, MixerTaps(student, inputs=False) as s_taps:
        teacher(x)
        t_in, t_out = t_taps.take()
        student(x.double())  # float32 -> float64 is exact: the student sees the very images
        _, s_out = s_taps.take()
        for st, blk, a, t, s in zip(stats, student.blocks, t_in, t_out, s_out):
            st["isolated"].add(blk.attn.token_mix(a.double()), t)
            st["in_model"].add(s, t)
    for blk, st in zip(r["blocks"], stats):  # the same operations in the same order: equal, not close
        assert blk["isolated"] == st["isolated"].result() and blk["in_model"] == st["in_model"].result()
    report = analyze(teacher, student, data, batch_size=5, map_images=2, parts=("block",))
    with torch.no_grad():
        h = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(x)))
        for blk in student.blocks:  # whole blocks replaced: the student's, on the teacher's stream cast both ways
            h = blk(h.double()).float()
        feat = teacher.fc_norm(teacher.norm(h)[:, 0])
        t_feat = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
        jf = row_normalize(jacobian_maps(student.blocks[0].attn, t_in[0][:2].double(), 3)).float()
    assert report["partial"]["block"][-1]["feature_cos"] == pytest.approx(
        float(nn.functional.cosine_similarity(feat.double(), t_feat.double(), dim=-1).mean()), abs=1e-12)
    np.testing.assert_array_equal(report["maps"]["arrays"]["jacobian_far"][0], jf.numpy())
    r = block_fidelity(teacher, far.convert(copy.deepcopy(teacher)).bfloat16(), data, batch_size=2)
    assert all(math.isfinite(blk["isolated"]["cos"]) for blk in r["blocks"])


def test_mean_covers_the_same_blocks_for_both_kinds():
    # a partial student: its attention blocks before the FAR one have in-model cosine 1, which lifted the in-model
    # mean above the isolated one (over the FAR blocks alone) though no FAR block does better in the model
    from far.fidelity import block_fidelity

    teacher = tiny_vit(depth=3)
    student = far.convert(copy.deepcopy(teacher), blocks=[2])
    r = block_fidelity(teacher, student, tiny_data(), batch_size=4)
    assert [blk["far"] for blk in r["blocks"]] == [False, False, True]
    assert r["blocks"][0]["in_model"]["cos"] == pytest.approx(1, abs=1e-6)  # the teacher's own block
    for kind in ("isolated", "in_model"):
        for metric in ("cos", "token_cos", "rel_mse", "scale"):
            assert r["mean"][kind][metric] == r["blocks"][2][kind][metric]
    plain = block_fidelity(teacher, copy.deepcopy(teacher), tiny_data(), batch_size=4)  # no FAR block at all
    assert plain["mean"]["isolated"] is None
    assert plain["mean"]["in_model"]["cos"] == pytest.approx(1, abs=1e-6)


def test_distilled_deit_features_are_both_heads_inputs():
    # a distilled DeiT's get_classifier() is (head, head_dist): analyze refused it as having "no classifier head"
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    teacher = VisionTransformerDistilled(img_size=16, patch_size=8, in_chans=1, num_classes=5, embed_dim=12, depth=2,
                                         num_heads=3, mlp_ratio=2.0).eval()
    student = far.convert(copy.deepcopy(teacher))
    data = tiny_data(n=5)
    x, _ = data.tensors
    r = analyze(teacher, student, data, batch_size=5, map_images=0)  # one batch, as computed below
    with torch.no_grad():
        t_tok, s_tok = teacher.forward_features(x), student.forward_features(x)  # after the final norm
        t_feat, s_feat = (torch.cat([h[:, 0], h[:, 1]], dim=-1) for h in (t_tok, s_tok))  # head's, head_dist's inputs
        agree = float((teacher(x).argmax(-1) == student(x).argmax(-1)).double().mean())
    assert r["full_student"]["feature_cos"] == pytest.approx(
        float(nn.functional.cosine_similarity(s_feat.double(), t_feat.double(), dim=-1).mean()), abs=1e-12)
    assert r["full_student"]["agreement"] == agree == r["agreement"]
    assert r["partial"]["block"][-1]["feature_cos"] == pytest.approx(r["full_student"]["feature_cos"], abs=1e-6)
    teacher.reset_classifier(0)  # both heads Identity: still no classifier to compare
    with pytest.raises(ConfigError, match="no classifier head"):
        analyze(teacher, student, data, map_images=0)

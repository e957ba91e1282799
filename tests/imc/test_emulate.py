"""far.imc: CrossbarLinear, emulate (which layers, FAR blocks per step), QuantizedAttention, calibrate.

Oracles: far_kernels.crossbar_matmul_ref for single products, and in the exactness-law configuration
(no noise, no ADC / granular ADC) the spec's s_x * s_w * (x_q @ w_q.T) + bias from imc_oracles,
chained through whole FAR blocks in float64.
"""
import copy
import itertools

import pytest
import torch
import torch.nn as nn

import far
import far_kernels
from far.imc import (CrossbarAttention, CrossbarGroupLinear, CrossbarLinear, GroupLinear, QuantizedAttention, UnrolledFARAttention, calibrate,
                     crossbar_groups, crossbar_layers, crossbar_products, emulate, emulation_targets, fake_quantize)
from far_kernels import CrossbarConfig
from imc_oracles import exact_product, quantize_rows, tiny_vit

EPS32 = torch.finfo(torch.float32).eps


def exact_cfg(**kw):
    """No noise, no ADC: the exactness law holds (cfg.is_exact)."""
    kw.setdefault("adc_bits", None)
    cfg = CrossbarConfig(**kw)
    assert cfg.is_exact
    return cfg


# ---------------------------------------------------------------- CrossbarLinear
CONFIGS = [
    pytest.param(dict(), id="isaac-default"),
    pytest.param(dict(adc_bits=6, tile_rows=16), id="adc6-max-t16"),
    pytest.param(dict(adc_bits=5, adc_range="granular", cell_bits=3, dac_bits=2, tile_rows=8), id="granular-c3-d2"),
    pytest.param(dict(encoding="offset", weight_scale="tensor", input_scale="tensor", tile_rows=16), id="offset-tensor"),
    pytest.param(dict(adc_bits=6, adc_range="calibrated", tile_rows=16), id="calibrated"),
    pytest.param(dict(prog_noise=0.05, stuck_at=(0.02, 0.01), tile_rows=16, seed=3), id="programming-noise"),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_crossbar_linear_matches_reference(kw):
    """Fresh data, K = 37 (not a multiple of tile_rows), leading shape [2, 3]: bit-identical to the reference
    (same programming, same read-noise sequence)."""
    torch.manual_seed(0)
    cfg = CrossbarConfig(**kw)
    lin = nn.Linear(37, 5)
    xb = CrossbarLinear.from_linear(lin, cfg, backend="torch")
    x = torch.randn(2, 3, 37)
    r = None
    if cfg.adc_range == "calibrated":
        r = far_kernels.crossbar_partial_sum_absmax(x, xb.programmed) * 0.5  # clips the largest partial sums
        xb.set_adc_range(r)
    prog_ref = far_kernels.program_crossbar(lin.weight.detach(), cfg)
    for _ in range(2):  # the second call gets fresh read noise in both
        y = xb(x)
        ref = far_kernels.crossbar_matmul_ref(x, prog_ref, cfg, bias=lin.bias.detach(), adc_range=r)
        assert y.shape == (2, 3, 5) and torch.isfinite(y).all()
        assert torch.equal(y, ref.to(y.dtype))
    assert not torch.equal(lin.weight, torch.zeros_like(lin.weight))  # from_linear left the layer alone


def test_crossbar_linear_read_noise_matches_reference_in_distribution():
    """Read noise: the batched torch backend draws its N(0, sigma) per partial sum in another order than the
    reference, so outputs agree in distribution, not bit for bit. Over 4096 x 16 outputs the spread of
    (noisy - noiseless) is estimated to ~1%; the two backends must agree within 10%. Every call draws
    afresh; the same seed reproduces the sequence."""
    torch.manual_seed(11)
    cfg = CrossbarConfig(read_noise=0.02, adc_bits=8, tile_rows=16, seed=4)
    clean = cfg.replace(read_noise=0.0)
    lin = nn.Linear(37, 16)
    x = torch.randn(4096, 37)
    xb = CrossbarLinear.from_linear(lin, cfg, backend="torch")
    prog = far_kernels.program_crossbar(lin.weight.detach(), cfg)
    y0 = far_kernels.crossbar_matmul_ref(x, far_kernels.program_crossbar(lin.weight.detach(), clean), clean,
                                         bias=lin.bias.detach())
    y1, y2 = xb(x), xb(x)
    ref = far_kernels.crossbar_matmul_ref(x, prog, cfg, bias=lin.bias.detach())
    assert not torch.equal(y1, y2)  # fresh draws each call
    assert torch.equal(CrossbarLinear.from_linear(lin, cfg, backend="torch")(x), y1)  # reproducible
    s_ours, s_ref = (y1 - y0).std().item(), (ref - y0).std().item()
    assert s_ref > 0 and 0.9 < s_ours / s_ref < 1.1, (s_ours, s_ref)
    assert abs((y1 - y0).mean().item()) < 5 * s_ours / (y1.numel() ** 0.5) + 1e-6  # unbiased


@pytest.mark.parametrize("kw", [dict(), dict(encoding="offset", weight_scale="tensor", input_scale="tensor"),
                                dict(adc_bits=12, adc_range="granular", tile_rows=16)],
                         ids=["no-adc", "offset-tensor", "granular-12b-t16"])
def test_crossbar_linear_exactness_law(kw):
    """No noise and no clipping ADC: y = s_x * s_w * (x_q @ w_q.T) + bias; only the final fp32 scaling rounds."""
    torch.manual_seed(1)
    cfg = exact_cfg(**kw) if "adc_bits" not in kw else CrossbarConfig(**kw)
    assert cfg.is_exact
    lin = nn.Linear(37, 6)
    x = torch.randn(4, 37) * 3
    y = CrossbarLinear.from_linear(lin, cfg)(x)
    ref = exact_product(x, lin.weight, cfg, lin.bias)
    unbiased = exact_product(x, lin.weight, cfg)
    tol = 4 * EPS32 * (unbiased.abs() + ref.abs()) + 1e-30
    assert ((y.double() - ref).abs() <= tol).all(), (y.double() - ref).abs().max()
    # and the products really are quantized: the float product differs by much more than the tolerance
    assert (y.double() - (x.double() @ lin.weight.double().T + lin.bias.double())).abs().max() > 10 * tol.max()


def test_crossbar_linear_module_behaviour():
    torch.manual_seed(2)
    cfg = CrossbarConfig(tile_rows=16)
    lin = nn.Linear(20, 4, bias=False)
    xb = CrossbarLinear.from_linear(lin, cfg)
    assert xb.bias is None and xb.in_features == 20 and xb.out_features == 4
    assert "in_features=20, out_features=4" in repr(xb) and "adc 8b max" in repr(xb)
    assert list(dict(xb.named_parameters())) == []  # nothing trainable or float-weight-like is kept
    x = torch.randn(3, 20)
    y0 = xb(x)
    xb2 = xb.to("cpu").to(torch.float32)  # .to() keeps the programmed cells usable
    assert xb2 is xb and xb.programmed.device == torch.device("cpu")
    assert torch.equal(xb(x), y0)
    xb.half()  # a dtype cast leaves the cells alone; the output follows the input's dtype
    assert xb.programmed.levels.dtype == torch.int8 and torch.equal(xb(x), y0)
    with pytest.raises(ValueError, match=r"expected x \[\.\.\., 20\]"):
        xb(torch.randn(3, 21))
    with pytest.raises(TypeError, match="nn.Linear"):
        CrossbarLinear.from_linear(nn.Conv2d(1, 1, 1), cfg)
    with pytest.raises(TypeError, match="CrossbarConfig"):
        CrossbarLinear.from_linear(lin, {"adc_bits": 8})
    cal = CrossbarLinear.from_linear(lin, CrossbarConfig(adc_range="calibrated", tile_rows=16))
    assert "NOT calibrated" in repr(cal)
    with pytest.raises(RuntimeError, match="far.imc.calibrate"):
        cal(x)
    for bad in (0.0, -1.0, float("nan"), [1.0, 2.0]):
        with pytest.raises(ValueError, match="adc_range"):
            cal.set_adc_range(bad)
    cal.set_adc_range([10.0] * cfg.n_weight_slices)
    assert torch.isfinite(cal(x)).all() and ", calibrated" in repr(cal)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_crossbar_linear_to_cuda():
    torch.manual_seed(3)
    lin = nn.Linear(40, 8)
    xb = CrossbarLinear.from_linear(lin, CrossbarConfig(tile_rows=16), backend="torch")
    x = torch.randn(5, 40)
    y = xb(x)
    xb.cuda()
    assert xb.programmed.device.type == "cuda" and xb.bias.device.type == "cuda"
    assert torch.equal(xb(x.cuda()).cpu(), y)


# ---------------------------------------------------------------- digital quantized attention
def test_fake_quantize():
    torch.manual_seed(4)
    x = torch.randn(6, 9) * 5
    x[2] = 0
    for bits in (2, 4, 8):
        L = 2 ** (bits - 1) - 1
        q = fake_quantize(x, bits, dim=-1)
        s = x.abs().amax(dim=-1, keepdim=True) / L
        assert torch.equal(q[2], torch.zeros(9))  # an all-zero row stays zero
        ok = s.squeeze(1) > 0
        k = q[ok] / s[ok]
        assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= L + 1e-4  # on the grid, in range
        assert ((q - x).abs() <= s / 2 * (1 + 1e-5)).all()  # round to nearest
        qt = fake_quantize(x, bits)  # one scale for the tensor
        st = x.abs().max() / L
        assert ((qt - x).abs() <= st / 2 * (1 + 1e-5)).all()
    for empty in (torch.randn(0, 9), torch.randn(3, 0)):  # no element: nothing to scale (amax used to raise)
        assert fake_quantize(empty, 8).shape == empty.shape and fake_quantize(empty, 8, dim=0).shape == empty.shape


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fake_quantize_on_cuda_equals_the_cpu():
    """The scale max|x| / L is an IEEE quotient on the GPU too (ATen divides a CUDA tensor by a Python number with
    its fp32 reciprocal: about 4% of scales at L = 127 were an ulp off the CPU's)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4096, 64, generator=g) * torch.rand(4096, 1, generator=g) * 10
    for bits in (4, 8):
        for dim in (-1, None):
            assert torch.equal(fake_quantize(x.cuda(), bits, dim=dim).cpu(), fake_quantize(x, bits, dim=dim))


def test_quantized_attention_converges_to_attention():
    """q, k, v and the probabilities at b bits: the error vs timm's attention shrinks ~2^-b."""
    model = tiny_vit()
    attn = model.blocks[0].attn
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        ref = attn(x)
        errs = {b: (QuantizedAttention(attn, bits=b)(x) - ref).abs().max().item() for b in (4, 8, 12)}
        qt = QuantizedAttention(attn, bits=8, scale="tensor")(x)
    assert errs[4] > errs[8] > errs[12] and errs[12] < errs[4] * 2.0 ** -6, errs
    assert (qt - ref).abs().max() < 4 * errs[4]
    with pytest.raises(ValueError, match="scale"):
        QuantizedAttention(attn, scale="col")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_attention_of_a_half_model_quantizes_in_fp32(dtype):
    """A bf16/fp16 model's digital attention products: q, k, v and the probabilities are quantized as the design says
    (fp32, round half to even) and multiplied in fp32, then rounded once to the model's dtype, as a CrossbarLinear
    does. They used to be quantized in the half dtype, whose x / s rounds before round(): up to a third of the
    values of a bf16 model sat on another level than the fp32 quantizer's (8 bits, randn inputs)."""
    attn = tiny_vit().blocks[0].attn
    qa = QuantizedAttention(attn, bits=8)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g).to(dtype) for _ in range(3))
    p = torch.rand(2, 2, 7, 7, generator=g).softmax(-1).to(dtype)
    got, want = qa._scores(q, k), qa._scores(q.float(), k.float()).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want), (got.float() - want.float()).abs().max().item()
    got, want = qa._mix(p, v), qa._mix(p.float(), v.float()).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want), (got.float() - want.float()).abs().max().item()
    # and the fp32 side is the spec's quantizer: levels x_q = round(x / s) with s = max|x| / 127 per token
    xq, sx = quantize_rows(q.float().reshape(-1, 8), 8, per_row=True)
    kq, sk = quantize_rows(k.float().reshape(-1, 8), 8, per_row=True)
    ref = torch.einsum("bhmd,bhnd->bhmn", (xq * sx[:, None]).view(2, 2, 7, 8), (kq * sk[:, None]).view(2, 2, 7, 8))
    assert (qa._scores(q.float(), k.float()).double() - ref).abs().max() < 8 * 2.0 ** -23 * ref.abs().max()


def _loop_products(q, w, cfg):
    """q [B, H, M, K] read through each w[b, h] [N, K] programmed alone: the reference, one product at a time."""
    B, H, M, _ = q.shape
    out = torch.empty(B, H, M, w.shape[2])
    for b in range(B):
        for h in range(H):
            out[b, h] = far_kernels.crossbar_matmul_ref(q[b, h], far_kernels.program_crossbar(w[b, h], cfg), cfg)
    return out


@pytest.mark.parametrize("kw", [dict(adc_bits=6, tile_rows=4), dict(encoding="offset", weight_scale="tensor",
                                                                    adc_range="granular", tile_rows=16)],
                         ids=["a6-max-t4", "offset-granular"])
def test_crossbar_attention_products_equal_reference(kw):
    """dynamic="crossbar" without noise: q k^T is q read through K programmed per (image, head), p v is p
    read through V^T, each bit-identical to crossbar_matmul_ref on that member programmed alone; the
    block output is the timm computation around those products."""
    torch.manual_seed(13)
    cfg = CrossbarConfig(**kw)
    model = tiny_vit()
    attn = model.blocks[0].attn
    xa = CrossbarAttention(attn, cfg, seed=3)
    q, k, v = torch.randn(3, 3, 2, 5, 8).unbind(0)
    p = torch.rand(3, 2, 5, 5).softmax(-1)
    assert torch.equal(xa._scores(q, k), _loop_products(q, k, cfg))
    assert torch.equal(xa._mix(p, v), _loop_products(p, v.transpose(-2, -1), cfg))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        qq, kk, vv = qkv.unbind(0)
        s = (_loop_products(qq, kk, cfg) * attn.scale).softmax(-1)
        want = attn.proj(_loop_products(s, vv.transpose(-2, -1), cfg).transpose(1, 2).reshape(B, N, C))
        assert torch.equal(xa(x), want)
        assert (xa(x) - attn(x)).abs().max() < 0.1 * attn(x).abs().max()  # close to the float block


def test_crossbar_attention_noise_and_calibration():
    model = tiny_vit()
    x = torch.randn(2, 1, 8, 8)
    cfg = CrossbarConfig(tile_rows=16, prog_noise=0.05, read_noise=0.01, seed=2)
    emu = emulate(model, cfg, include="*.attn", dynamic="crossbar")
    assert isinstance(emu.blocks[0].attn, CrossbarAttention) and emu.blocks[0].attn.seed != emu.blocks[1].attn.seed
    assert "crossbar-dynamic" in emu.imc_emulation.table() and not crossbar_layers(emu)  # qkv, proj stay digital
    with torch.no_grad():
        y1, y2 = emu(x), emu(x)
        y1b = emulate(model, cfg, include="*.attn", dynamic="crossbar")(x)
        clean = emulate(model, cfg.replace(prog_noise=0.0, read_noise=0.0), include="*.attn", dynamic="crossbar")(x)
    assert not torch.equal(y1, y2)  # K and V are written afresh (new noise) for every input
    assert torch.equal(y1, y1b)  # and the sequence is reproducible from the seed
    assert not torch.equal(y1, clean)
    cal = emulate(model, CrossbarConfig(tile_rows=16, adc_bits=5, adc_range="calibrated"), dynamic="crossbar")
    with pytest.raises(RuntimeError, match="far.imc.calibrate"):
        cal(x)
    ranges = calibrate(cal, x, per_slice=True)
    assert {"blocks.0.attn.qk", "blocks.0.attn.pv", "blocks.1.attn.qk"} <= set(ranges)
    assert ranges["blocks.0.attn.qk"].shape == (cal.blocks[0].attn.cfg.n_weight_slices,)
    with torch.no_grad():
        assert torch.isfinite(cal(x)).all()
    with pytest.raises(ValueError, match="dynamic must be one of"):
        emulate(model, cfg, dynamic="analog")


@pytest.mark.parametrize("per_slice", [False, True])
def test_crossbar_attention_calibrated_ranges_equal_reference(per_slice):
    """dynamic="crossbar", adc_range="calibrated": each of the two products gets the max |partial sum| (per weight
    slice or overall) over every (image, head) member it read while calibrating as a "max" ADC (so S.V's range is
    taken on the probabilities that q k^T gave under that ADC), and then reads every member with that range; checked
    against crossbar_matmul_ref on each member programmed alone, bit for bit."""
    attn = tiny_vit(embed_dim=24, num_heads=3).blocks[0].attn
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(8))
    cfg = CrossbarConfig(adc_bits=5, adc_range="calibrated", tile_rows=4)

    def loop(a, w, rec=None, r=None):  # a [B, H, M, K] read through each w[b, h] [N, K] programmed alone
        out = torch.empty(*a.shape[:3], w.shape[2])
        for b, h in itertools.product(range(a.shape[0]), range(a.shape[1])):
            prog = far_kernels.program_crossbar(w[b, h].contiguous(), cfg)
            if rec is not None:
                rec.append(far_kernels.crossbar_partial_sum_absmax(a[b, h], prog))
            else:
                prog.adc_range = r
            read = cfg.replace(adc_range="max") if r is None else None  # calibrating: a "max" ADC
            out[b, h] = far_kernels.crossbar_matmul_ref(a[b, h], prog, read)
        return out

    def block(recs=(None, None), rs=(None, None)):
        q, k, v = attn.qkv(x).view(3, 5, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)
        p = (loop(q, k, recs[0], rs[0]) * attn.scale).softmax(-1)
        return attn.proj(loop(p, v.transpose(-2, -1), recs[1], rs[1]).transpose(1, 2).reshape(3, 5, 24))

    xa = CrossbarAttention(attn, cfg, seed=1)
    xa.layer_name = "a"
    with torch.no_grad():
        xa.begin_calibration()
        xa(x)
        got = xa.end_calibration(per_slice)
        recs = ([], [])
        block(recs=recs)
        want = [torch.stack(r).amax(0) if per_slice else torch.stack(r).amax() for r in recs]
        assert torch.equal(got["a.qk"], want[0]) and torch.equal(got["a.pv"], want[1]), (got, want)
        assert torch.equal(xa(x), block(rs=want))


# ---------------------------------------------------------------- emulate: which layers
def test_emulate_all_layers_of_a_vit():
    model = tiny_vit()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y_float = model(x)
    cfg = CrossbarConfig(tile_rows=16)
    emu = emulate(model, cfg)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    attns = [n for n, m in model.named_modules() if type(m).__name__ == "Attention"]
    assert len(linears) == 2 * 4 + 1 and len(attns) == 2
    for n in linears:
        assert isinstance(emu.get_submodule(n), CrossbarLinear), n
        assert emu.get_submodule(n).layer_name == n
    for n in attns:
        assert isinstance(emu.get_submodule(n), QuantizedAttention) and emu.get_submodule(n).bits == cfg.input_bits
    assert not any(type(m) is nn.Linear for m in emu.modules())
    assert isinstance(emu.patch_embed.proj, nn.Conv2d)  # stays digital
    # a copy: the input model is untouched and still gives the float result
    assert not crossbar_layers(model)
    with torch.no_grad():
        assert torch.equal(model(x), y_float)
        y = emu(x)
    assert y.shape == y_float.shape and torch.isfinite(y).all() and not torch.equal(y, y_float)
    assert len(emu.imc_emulation.rows) == len(linears) + len(attns) and not emu.imc_emulation.skipped
    assert "crossbar products" in emu.imc_emulation.table()


@pytest.mark.parametrize("pool", ["map", "prr"])
@pytest.mark.parametrize("dynamic", ["digital", "crossbar"])
def test_attention_pool_products_are_named_as_not_emulated(pool, dynamic):
    """timm's attention pools (global_pool "map", "prr") compute q@k^T and attn@v that emulate cannot map: they stay
    digital in full precision, and the report says so (it used to list nothing, as if every product were
    emulated). The pool's Linears are emulated like any other; in the exactness-law config the model stays within
    the 16-bit quantization of the float one."""
    model = tiny_vit(global_pool=pool)
    emu = emulate(model, exact_cfg(weight_bits=16, input_bits=16, cell_bits=4, dac_bits=4), dynamic=dynamic)
    rep = emu.imc_emulation
    assert [n for n, _ in rep.unemulated] == ["attn_pool"]
    assert "attn_pool" in rep.table() and "not emulated" in rep.table()
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(crossbar_products(emu)) == sorted(linears)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y, ref = emu(x), model(x)
    # each of the ~10 chained products rounds x and w to 15 magnitude bits: a few 2^-15 of the logits' scale
    assert (y - ref).abs().max() <= 64 * 2.0 ** -15 * ref.abs().max()
    plain = emulate(tiny_vit(), CrossbarConfig()).imc_emulation
    assert plain.unemulated == [] and "not emulated" not in plain.table()


def test_emulate_include_exclude():
    model = tiny_vit()
    cfg = CrossbarConfig(tile_rows=16)
    names = [n for n, _ in emulation_targets(model)]
    emu = emulate(model, cfg, include="blocks.1.*", exclude=["*.fc2"])
    got = {n for n, m in emu.named_modules() if isinstance(m, (CrossbarLinear, QuantizedAttention))}
    assert got == {"blocks.1.attn", "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1"}
    assert set(emu.imc_emulation.skipped) == set(names) - got
    assert type(emu.blocks[0].attn.qkv) is nn.Linear and type(emu.head) is nn.Linear
    # exclude the attention products only: its Linears still become crossbars
    emu = emulate(model, cfg, exclude="blocks.*.attn")
    assert isinstance(emu.blocks[0].attn.qkv, CrossbarLinear) and type(emu.blocks[0].attn).__name__ == "Attention"
    # in place
    m2 = copy.deepcopy(model)
    out = emulate(m2, cfg, include="head", inplace=True)
    assert out is m2 and isinstance(m2.head, CrossbarLinear)


@pytest.mark.parametrize("kwargs,match", [
    (dict(include="blocks.9.*"), "include pattern 'blocks.9.\\*' matches no emulatable layer"),
    (dict(exclude=["head", "hed"]), "exclude pattern 'hed'"),
    (dict(include="head", exclude="head"), "leave no layer"),
    (dict(include=3), "glob pattern"),
])
def test_emulate_bad_patterns(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        emulate(tiny_vit(), CrossbarConfig(), **kwargs)


def test_emulate_bad_inputs():
    model = tiny_vit()
    with pytest.raises(TypeError, match="CrossbarConfig"):
        emulate(model, dict(adc_bits=8))
    emu = emulate(model, CrossbarConfig(tile_rows=16))
    with pytest.raises(ValueError, match="already emulated"):
        emulate(emu, CrossbarConfig())
    with pytest.raises(ValueError, match="nothing to emulate"):
        emulate(nn.Sequential(nn.ReLU()), CrossbarConfig())
    with pytest.raises(ValueError, match="CrossbarLinear.from_linear"):
        emulate(nn.Linear(3, 3), CrossbarConfig())


@pytest.mark.parametrize("bad", ["head.weight", "blocks.1.attn.w_hh"])
def test_emulate_failure_leaves_an_inplace_model_untouched(bad):
    """A weight that cannot be programmed (NaN) in a late layer: emulate(inplace=True) raises naming that layer
    and leaves the model as it was (it used to have converted every earlier layer, and a second emulate then
    refused the half-emulated model as "already emulated")."""
    model = far.convert(tiny_vit(), hidden_sizes=[4, [[3, 4], [2, 0]]])
    with torch.no_grad():
        model.get_parameter(bad)[(0,) * model.get_parameter(bad).dim()] = float("nan")
    before = {n: type(m) for n, m in model.named_modules()}
    where = "head" if bad == "head.weight" else "blocks.1.attn.w_hh"
    with pytest.raises(ValueError, match=f"{where}: program_crossbar: w holds NaN"):
        emulate(model, CrossbarConfig(tile_rows=16, **FAST), inplace=True)
    assert {n: type(m) for n, m in model.named_modules()} == before and not hasattr(model, "imc_emulation")
    with torch.no_grad():
        model.get_parameter(bad).nan_to_num_(0.0)
    assert crossbar_products(emulate(model, CrossbarConfig(tile_rows=16, **FAST), inplace=True))  # now it can


def test_emulate_refuses_a_meta_model():
    """A model built on the meta device has no weight values to program: a clear error, not an internal one."""
    with torch.device("meta"):
        model = tiny_vit()
    with pytest.raises(ValueError, match="meta device"):
        emulate(model, CrossbarConfig())


# ---------------------------------------------------------------- FAR blocks
def far_block(hidden_sizes, seed=0, dim=8, heads=2):
    torch.manual_seed(seed)
    m = far.FARAttention(dim, num_heads=heads, hidden_sizes=hidden_sizes).eval()
    with torch.no_grad():  # LSTM-init weights are small; widen them so the gates are not all ~linear
        for p in (m.w_ih, m.w_hh):
            p.mul_(2.0)
        m.zero_padding_()
    return m


HIDDEN = [pytest.param(None, id="full"), pytest.param([[4, 3], [0, 2]], id="pruned-with-empty-direction")]


@pytest.mark.parametrize("mapping", ["separate", "fused"])
@pytest.mark.parametrize("hs", HIDDEN)
def test_unrolled_far_block_equals_far_block(hs, mapping):
    """The per-product module form (before any crossbar) is the same function as FARAttention, under either
    LSTM mapping."""
    m = far_block(hs)
    x = torch.randn(2, 5, 8)
    u = UnrolledFARAttention(m, mapping)
    with torch.no_grad():
        ref64 = UnrolledFARAttention(copy.deepcopy(m).double(), mapping)(x.double())
        out = u(x)
        out_far = m(x)
    assert torch.allclose(ref64, m.double().forward_reference(x.double()), atol=1e-12, rtol=0)
    err, err_far = (out.double() - ref64).abs().max().item(), (out_far.double() - ref64).abs().max().item()
    assert err <= 2 * err_far + 1e-6, (err, err_far)
    kept = far.FARAttention(8, 2, hidden_sizes=hs).hidden_sizes
    live = [(h, d) for h in range(2) for d in range(2) if int(kept[d, h]) > 0]
    if mapping == "fused":
        assert u.lstm.member_names == [f"{h}.{d}" for h, d in live] and not hasattr(u, "w_ih")
        assert u.lstm.sizes == [(4 * int(kept[d, h]), 4 + int(kept[d, h])) for h, d in live]
    else:
        assert u.w_ih.member_names == u.w_hh.member_names == [f"{h}.{d}" for h, d in live]
        for g, (h, d) in enumerate(live):
            k = int(kept[d, h])
            assert u.w_ih.sizes[g] == (4 * k, 4) and u.w_hh.sizes[g] == (4 * k, k)
    assert u.head_proj.member_names == [str(h) for h in range(2) if int(kept[:, h].sum()) > 0]
    assert type(u.pre_proj) is nn.Linear and type(u.proj) is nn.Linear


@pytest.mark.parametrize("mapping", ["separate", "fused"])
@pytest.mark.parametrize("hs", HIDDEN)
def test_unrolled_recurrence_of_a_bf16_block_rounds_only_its_output(hs, mapping):
    """A bf16 FAR block: the model's own scan keeps the LSTM state, gates and the W_hh product in fp32 and rounds h
    once to bf16; the unrolled block ran them in bf16, whose cell state gathers a rounding per step (on the
    fmnist_far_tiny_xs zoo model at near-exact crossbar settings the emulated logits were 3.5x further from the fp32
    ones than the bf16 model's own). Now: |h - h_f64| <= bf16's unit roundoff times |h| (2^-8: 8 significant bits) + fp32's error over N
    steps (2^-16 covers N = 50 with room), h_f64 the same recurrence on the same bf16 inputs and weights in fp64."""
    m = copy.deepcopy(far_block(hs, dim=16)).to(torch.bfloat16)
    u = UnrolledFARAttention(m, mapping)
    G, N = len(u.lstms), 50
    width = u.w_ih.out_features if mapping == "separate" else m.head_dim
    gx = (2 * torch.randn(G, 3, N, width, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16)
    with torch.no_grad():
        h, h64 = u._recurrence(gx, N), u._recurrence(gx.double(), N)
    assert h.dtype == torch.bfloat16 and h64.dtype == torch.float64
    err = (h.double() - h64).abs()
    assert (err <= 2.0 ** -8 * h64.abs() + 2.0 ** -16).all(), (err - 2.0 ** -8 * h64.abs()).max().item()


def test_emulate_far_model_targets():
    model = far.convert(tiny_vit(), hidden_sizes=[[[4, 3], [0, 2]], 8])
    names = dict(emulation_targets(model))
    # hidden_sizes[direction][head]: head 0 / backward keeps no unit, so it has no crossbar
    assert {"blocks.0.attn.w_hh.0.0", "blocks.0.attn.w_hh.1.0", "blocks.0.attn.w_hh.1.1"} <= set(names)
    assert "blocks.0.attn.w_ih.0.1" not in names and "blocks.0.attn.w_hh.0.1" not in names
    assert "blocks.0.attn.pre_proj" in names and "blocks.1.attn.head_proj.1" in names
    assert not any(k == "digital-quantized" for k in names.values())  # no attention left in a FAR model
    emu = emulate(model, CrossbarConfig(tile_rows=16), include="*.w_hh.*")
    assert isinstance(emu.blocks[0].attn, UnrolledFARAttention)
    assert not crossbar_layers(emu)  # the recurrent products are members of one grouped crossbar module
    assert set(crossbar_products(emu)) == {n for n in names if ".w_hh." in n}
    assert type(emu.blocks[0].attn.pre_proj) is nn.Linear and type(emu.blocks[0].attn.w_ih) is GroupLinear
    # a group with some members on crossbars: the others stay digital and exact
    emu = emulate(model, CrossbarConfig(tile_rows=16), include="blocks.0.attn.w_hh.1.*")
    grp = emu.blocks[0].attn.w_hh
    assert isinstance(grp, CrossbarGroupLinear) and grp.crossbar_names == ["blocks.0.attn.w_hh.1.0",
                                                                          "blocks.0.attn.w_hh.1.1"]
    dig = UnrolledFARAttention(model.blocks[0].attn).w_hh
    x = torch.randn(dig.weight.shape[0], 6, dig.in_features)
    with torch.no_grad():
        y, y_dig = grp(x), dig(x)
    on = [g for g, n in enumerate(grp.member_names) if n in grp.crossbar_names]
    off = [g for g in range(len(grp.member_names)) if g not in on]
    assert torch.equal(y[off], y_dig[off]) and not torch.equal(y[on], y_dig[on])
    # only the MLPs: FAR blocks stay fused FARAttention modules
    emu = emulate(model, CrossbarConfig(tile_rows=16), include="*.mlp.*")
    assert isinstance(emu.blocks[0].attn, far.FARAttention)


def test_emulate_far_projections_only():
    """pre_proj and proj on crossbars, the BiLSTM digital: the block stays a fused FARAttention whose pre_proj
    is a CrossbarLinear (no float weight); its forward used to read pre_proj.weight and fail."""
    model = far.convert(tiny_vit(), hidden_sizes=[[[4, 3], [0, 2]], 8]).eval()
    cfg = exact_cfg(tile_rows=16)
    emu = emulate(model, cfg, include=["*.attn.pre_proj", "*.attn.proj"])
    attn = emu.blocks[0].attn
    assert isinstance(attn, far.FARAttention) and isinstance(attn.pre_proj, CrossbarLinear)
    assert set(crossbar_products(emu)) == {f"blocks.{i}.attn.{p}" for i in range(len(model.blocks))
                                           for p in ("pre_proj", "proj")}
    x = torch.randn(3, model.patch_embed.num_patches + 1, model.embed_dim)
    ref = model.blocks[0].attn
    with torch.no_grad():
        # the exactness law's products in float64, the BiLSTM of the float block in between
        h = exact_product(x, ref.pre_proj.weight, cfg, ref.pre_proj.bias).float()
        ref_pre, ref.pre_proj = ref.pre_proj, nn.Identity()
        try:
            mixed = ref.token_mix(h)
        finally:
            ref.pre_proj = ref_pre
        want = exact_product(mixed, ref.proj.weight, cfg, ref.proj.bias)
        got = attn(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="x is torch.float64"):  # the dtype check still works
        attn(x.double())


def record_calls(model):
    """{product name: [(input, output), ...]} of every crossbar product call (forward hooks); a grouped call
    is split into its members' own calls (member g reads x[g, :, :K_g] and writes y[g, :, :N_g])."""
    calls, handles = {}, []
    for name, m in crossbar_layers(model):
        calls[name] = []
        handles.append(m.register_forward_hook(
            lambda mod, inp, out, name=name: calls[name].append((inp[0].detach().clone(), out.detach().clone()))))
    for _, m in crossbar_groups(model):
        for g in m.sel:
            calls[m.member_names[g]] = []

        def hook(mod, inp, out):
            for g in mod.sel:
                n, k = mod.sizes[g]
                assert (inp[0][g, :, k:] == 0).all()  # padding beyond a member's rows carries nothing
                calls[mod.member_names[g]].append((inp[0][g, :, :k].detach().clone(), out[g, :, :n].detach().clone()))
        handles.append(m.register_forward_hook(hook))
    return calls, handles


def lstm_step(g, c):
    i, f, gg, o = g.double().chunk(4, dim=-1)
    c = torch.sigmoid(i) * torch.tanh(gg) + (0 if c is None else torch.sigmoid(f) * c)
    return torch.sigmoid(o) * torch.tanh(c), c


H_TOL = 1e-5  # fp32 LSTM math vs float64 for one step, |h| <= 1: ~100 ulps; wrong wiring is off by O(0.1)


@pytest.mark.parametrize("hs", HIDDEN)
@pytest.mark.parametrize("kw", [dict(weight_bits=8, input_bits=8, cell_bits=4, dac_bits=4),
                                dict(weight_bits=6, input_bits=5, cell_bits=3, dac_bits=2, encoding="offset",
                                     weight_scale="tensor", input_scale="tensor", tile_rows=3)],
                         ids=["w8-x8", "w6-x5-offset-tensor-t3"])
def test_emulated_far_block_products_and_recurrence(hs, kw):
    """Exactness-law config. Every crossbar call of an emulated FAR block (pre_proj, W_ih per head and
    direction, W_hh once per time step from t = 0 on, head_proj, proj) equals s_x s_w (x_q @ w_q.T) + bias on
    its actual input; and, teacher-forced one step at a time from the recorded calls, each recurrent input
    is the previous step's h (zero at the first step, in the direction's time order), head_proj reads the h
    sequence, proj reads head_proj."""
    m = far_block(hs, seed=5)
    cfg = exact_cfg(**kw)
    B, N, d = 2, 5, m.head_dim
    x = torch.randn(B, N, 8)
    emu = emulate(nn.ModuleDict({"attn": m}), cfg, backend="torch")
    blk = emu["attn"]
    assert isinstance(blk, UnrolledFARAttention)
    calls, handles = record_calls(emu)
    with torch.no_grad():
        y = blk(x)
    for hd in handles:
        hd.remove()
    hsz = m.hidden_sizes
    w_of = {"attn.pre_proj": (m.pre_proj.weight, m.pre_proj.bias), "attn.proj": (m.proj.weight, m.proj.bias)}
    for h in range(2):
        w_of[f"attn.head_proj.{h}"] = m.head_proj_params(h)
        for dr in range(2):
            w_ih, w_hh, b_ih, b_hh = m.lstm_params(dr, h)
            w_of[f"attn.w_ih.{h}.{dr}"] = (w_ih, b_ih + b_hh)
            w_of[f"attn.w_hh.{h}.{dr}"] = (w_hh, None)
    live = {n for n in w_of if not (".w_" in n and hsz[int(n[-1]), int(n[-3])] == 0)}
    assert set(calls) == live
    # 1. every product, on its actual input
    for name, seq in calls.items():
        w, b = w_of[name]
        assert len(seq) == (N if ".w_hh." in name else 1), name
        for inp, out in seq:
            ref = exact_product(inp, w, cfg, b)
            tol = 4 * EPS32 * (exact_product(inp, w, cfg).abs() + ref.abs()) + 1e-30
            assert ((out.double() - ref).abs() <= tol).all(), name
    # 2. the recurrence, one step at a time
    xh = calls["attn.pre_proj"][0][1]
    heads = []
    for h in range(2):
        hcat = []
        for dr in range(2):
            if hsz[dr, h] == 0:
                continue
            inp, gx = calls[f"attn.w_ih.{h}.{dr}"][0]
            assert torch.equal(inp, xh[..., h * d:(h + 1) * d].reshape(B * N, d))  # a grouped call: [B*N, d]
            gx = gx.view(B, N, -1)
            rec = calls[f"attn.w_hh.{h}.{dr}"]
            order = list(range(N)) if dr == 0 else list(range(N - 1, -1, -1))
            c, hseq = None, [None] * N
            assert torch.equal(rec[0][0], torch.zeros_like(rec[0][0]))  # h_{-1} = 0 is read too
            for s, t in enumerate(order):
                g = gx[:, t].double() + rec[s][1].double()
                hh, c = lstm_step(g, c)
                hseq[t] = hh
                if s < N - 1:
                    assert (rec[s + 1][0].double() - hh).abs().max() <= H_TOL, (h, dr, s)
            hcat.append(torch.stack(hseq, dim=1))
        inp, out = calls[f"attn.head_proj.{h}"][0]
        assert (inp.double() - torch.cat(hcat, dim=-1).reshape(B * N, -1)).abs().max() <= H_TOL
        heads.append(out.view(B, N, d))
    inp, out = calls["attn.proj"][0]
    assert torch.equal(inp, torch.cat(heads, dim=-1)) and torch.equal(out, y)


@pytest.mark.parametrize("hs", HIDDEN)
def test_emulated_fused_far_block_reads_x_and_h_in_one_product(hs):
    """lstm_mapping="fused": per (head, direction) one crossbar call per time step, on [x_t; h_{t-1}] (x_t the
    head's pre_proj slice in the direction's time order, h_{-1} = 0) against [W_ih | W_hh] with bias
    b_ih + b_hh, equal to s_x s_w (x_q @ w_q.T) + bias on its actual input; its gates give the next call's h."""
    m = far_block(hs, seed=5)
    cfg = exact_cfg(weight_bits=8, input_bits=8, cell_bits=4, dac_bits=4)
    B, N, d = 2, 5, m.head_dim
    x = torch.randn(B, N, 8)
    emu = emulate(nn.ModuleDict({"attn": m}), cfg, backend="torch", lstm_mapping="fused")
    assert emu.imc_emulation.lstm_mapping == "fused"
    assert not any(".w_ih." in n or ".w_hh." in n for n in crossbar_products(emu))
    calls, handles = record_calls(emu)
    with torch.no_grad():
        emu["attn"](x)
    for hd in handles:
        hd.remove()
    xh = calls["attn.pre_proj"][0][1].view(B, N, -1)
    hsz = m.hidden_sizes
    for h in range(2):
        for dr in range(2):
            k = int(hsz[dr, h])
            name = f"attn.lstm.{h}.{dr}"
            if k == 0:
                assert name not in calls
                continue
            w_ih, w_hh, b_ih, b_hh = m.lstm_params(dr, h)
            w, b = torch.cat((w_ih, w_hh), dim=1), b_ih + b_hh
            seq = calls[name]
            assert len(seq) == N
            order = list(range(N)) if dr == 0 else list(range(N - 1, -1, -1))
            c = None
            for s, t in enumerate(order):
                inp, out = seq[s]
                assert inp.shape == (B, d + k)
                assert torch.equal(inp[:, :d], xh[:, t, h * d:(h + 1) * d])
                if s == 0:
                    assert (inp[:, d:] == 0).all()
                ref = exact_product(inp, w, cfg, b)
                tol = 4 * EPS32 * (exact_product(inp, w, cfg).abs() + ref.abs()) + 1e-30
                assert ((out.double() - ref).abs() <= tol).all(), (name, s)
                hh, c = lstm_step(out, c)
                if s < N - 1:
                    assert (seq[s + 1][0][:, d:].double() - hh).abs().max() <= H_TOL, (name, s)
    with pytest.raises(ValueError, match="lstm_mapping must be one of"):
        emulate(nn.ModuleDict({"attn": m}), cfg, lstm_mapping="stacked")
    with pytest.raises(ValueError, match="matches no emulatable layer"):
        emulate(nn.ModuleDict({"attn": m}), cfg, include="*.w_hh.*", lstm_mapping="fused")


@pytest.mark.parametrize("mapping", ["separate", "fused"])
def test_emulated_far_block_approaches_float(mapping):
    """Exact ADC, more bits: the emulated block converges to the float block (error ~ 2^-bits)."""
    m = far_block([[4, 3], [0, 2]], seed=6)
    wrapper = nn.ModuleDict({"attn": m})
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = copy.deepcopy(m).double().forward_reference(x.double())
        errs = {}
        for b in (6, 10, 14):
            cfg = exact_cfg(weight_bits=b, input_bits=b, cell_bits=5, dac_bits=5)
            errs[b] = (emulate(wrapper, cfg, lstm_mapping=mapping)["attn"](x).double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert errs[6] > errs[10] > errs[14], errs
    assert errs[10] < errs[6] * 2.0 ** -2 and errs[14] < errs[10] * 2.0 ** -2, errs
    assert errs[14] < 1e-2 * scale, errs


FAST = dict(cell_bits=4, dac_bits=4)  # 2 weight x 2 input slices per product: fast on a CPU


def test_emulated_far_model_runs():
    model = far.convert(tiny_vit(depth=1), hidden_sizes=[[[4, 3], [0, 2]]])
    x = torch.randn(2, 1, 8, 8)
    emu = emulate(model, CrossbarConfig(tile_rows=16, adc_bits=6, **FAST))
    with torch.no_grad():
        y = emu(x)
        y_float = model(x)
    assert y.shape == y_float.shape and torch.isfinite(y).all()
    assert (y - y_float).abs().max() < 10 * y_float.abs().max()  # same ballpark, not garbage


@pytest.mark.parametrize("what", ["far-separate", "far-fused", "attn-digital", "attn-crossbar"])
def test_an_images_output_does_not_depend_on_its_batch_with_row_scales(what):
    """Users compare runs with different batch sizes (far imc-eval --batch-size): with per-row input scales (the
    default) every product quantizes each image's rows on their own (K and V are written per image), so without
    noise an image's emulated output is the same bits alone or in any batch. With input_scale="tensor" one scale
    spans the batch and the output changes with it: documented (design.md section 7) and warned by imc-eval."""
    model = tiny_vit(depth=1)
    if what.startswith("far"):
        model = far.convert(model, hidden_sizes=[[[2, 0], [1, 3]]])  # ragged, head 1 with no forward unit
    kw = dict(lstm_mapping=what.split("-")[1]) if what.startswith("far") else dict(dynamic=what.split("-")[1])
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    for scale in ("row", "tensor"):
        emu = emulate(model, CrossbarConfig(tile_rows=16, adc_bits=6, input_scale=scale, **FAST), **kw)
        with torch.no_grad():
            whole = emu(x)
            split = torch.cat([emu(x[:2]), emu(x[2:3]), emu(x[3:])])
        assert torch.isfinite(whole).all()
        assert torch.equal(whole, split) == (scale == "row"), (scale, (whole - split).abs().max().item())


def test_identical_far_blocks_read_independent_noise():
    """Two copies of one FAR block, emulated with read noise on their grouped products only (W_ih, W_hh,
    head_proj): each group reads its own draws (once every group keyed its noise by the model's seed alone, so
    W_hh at step t drew the same numbers in every block); the same seed reproduces them."""
    torch.manual_seed(3)
    a = far_block([[4, 3], [2, 4]], seed=2)
    model = nn.Sequential(a, copy.deepcopy(a))
    x = torch.randn(2, 5, 8)
    cfg = CrossbarConfig(adc_bits=8, adc_range="granular", read_noise=0.01, **FAST)
    grouped = ["*.w_ih.*", "*.w_hh.*", "*.head_proj.*"]
    emu = emulate(model, cfg, include=grouped)
    with torch.no_grad():
        clean = emulate(model, cfg.replace(read_noise=0.0), include=grouped)[0](x)
        y0, y1 = emu[0](x), emu[1](x)
        again = emulate(model, cfg, include=grouped)[0](x)
    assert not torch.equal(y0, clean) and not torch.equal(y1, clean)
    assert not torch.equal(y0, y1)
    assert torch.equal(again, y0)


# ---------------------------------------------------------------- calibrate
def test_calibrate_records_partial_sum_maxima():
    torch.manual_seed(7)
    cfg = CrossbarConfig(adc_bits=6, adc_range="calibrated", tile_rows=16, **FAST)
    model = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3))
    emu = emulate(model, cfg)
    batches = [torch.randn(4, 20) for _ in range(3)]
    with pytest.raises(RuntimeError, match="far.imc.calibrate"):
        emu(batches[0])
    ranges = calibrate(emu, [(b, None) for b in batches], per_slice=True)
    assert set(ranges) == {"0", "2"}
    l0, l2 = emu[0], emu[2]
    # layer 0 sees the data itself
    want0 = torch.stack([far_kernels.crossbar_partial_sum_absmax(b, l0.programmed) for b in batches]).amax(0)
    want0 = torch.where(want0 > 0, want0, torch.full_like(want0, float(cfg.p_max)))
    assert torch.equal(ranges["0"], want0.float()) and ranges["0"].shape == (cfg.n_weight_slices,)
    # layer 2 sees layer 0 run with an uncalibrated (full-range) ADC
    h = [torch.relu(far_kernels.crossbar_matmul(b, l0.programmed, l0.cfg.replace(adc_range="max"), bias=l0.bias))
         for b in batches]
    want2 = torch.stack([far_kernels.crossbar_partial_sum_absmax(t, l2.programmed) for t in h]).amax(0)
    want2 = torch.where(want2 > 0, want2, torch.full_like(want2, float(cfg.p_max)))
    assert torch.equal(ranges["2"], want2.float())
    assert ((ranges["0"] > 0) & (ranges["0"] <= cfg.p_max)).all()
    # calibrated beats the full range at the same ADC bits (finer steps where the data is)
    x = torch.randn(64, 20)
    with torch.no_grad():
        exact = emulate(model, exact_cfg(tile_rows=16))(x)
        y_cal = emu(x)
        y_max = emulate(model, cfg.replace(adc_range="max"))(x)
    assert (y_cal - exact).abs().mean() < 0.5 * (y_max - exact).abs().mean()
    # per layer (default): one scalar per layer, the max over slices
    emu2 = emulate(model, cfg)
    r2 = calibrate(emu2, torch.cat(batches))
    assert r2["0"].dim() == 0 and r2["0"] == ranges["0"].max()


def test_calibrating_layers_run_as_a_max_adc():
    """While calibrating, every product reads as adc_range="max" does (calibrate's docstring), bit for bit: a
    CrossbarLinear ran a calibrated ADC with range p_max instead, whose fp32 step p_max/L and per-slice epilogue
    round differently (125 of these 320 outputs an ulp or so off), so its outputs, which later layers calibrate
    on, were not the grouped products' (which use "max")."""
    cfg = CrossbarConfig(adc_bits=6, adc_range="calibrated", tile_rows=8)
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 12, generator=g), torch.randn(64, 12, generator=g)
    lin = CrossbarLinear.from_weight(w, None, cfg)
    grp = CrossbarGroupLinear(GroupLinear(["a"], [w]), cfg, [True], [cfg.seed])
    want = far_kernels.crossbar_matmul(x, lin.programmed, cfg.replace(adc_range="max"))
    assert not torch.equal(far_kernels.crossbar_matmul(x, lin.programmed, cfg, adc_range=cfg.p_max), want)
    for m, inp in ((lin, x), (grp, x[None])):
        m.begin_calibration()
        y = m(inp).reshape(want.shape)
        m.end_calibration(None)
        assert torch.equal(y, want), type(m).__name__


def test_calibrate_bad_inputs():
    with pytest.raises(ValueError, match="emulate it first"):
        calibrate(nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3))
    emu = emulate(nn.Sequential(nn.Linear(3, 3)), CrossbarConfig(adc_range="calibrated"))
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(emu, [])
    assert all(m._calib is None for _, m in crossbar_layers(emu))  # nothing left half-set
    assert emu[0].adc_range is None


def test_calibrate_a_far_model_runs():
    model = far.convert(tiny_vit(depth=1), hidden_sizes=4)
    emu = emulate(model, CrossbarConfig(tile_rows=16, adc_bits=5, adc_range="calibrated", **FAST))
    ranges = calibrate(emu, [torch.randn(2, 1, 8, 8)])
    assert set(ranges) == set(crossbar_products(emu))
    assert any(".w_hh." in n for n in ranges)
    for _, grp in crossbar_groups(emu):  # every member got its own range
        assert all(m.adc_range is not None for m in grp.group.members)
    with torch.no_grad():
        assert torch.isfinite(emu(torch.randn(2, 1, 8, 8))).all()
    # a Dataset of (image, label) is batched (its single images used to reach the model as batches)
    images = torch.randn(5, 1, 8, 8)
    again = emulate(model, CrossbarConfig(tile_rows=16, adc_bits=5, adc_range="calibrated", **FAST))
    by_items = calibrate(again, torch.utils.data.TensorDataset(images, torch.zeros(5, dtype=torch.long)))
    again2 = emulate(model, CrossbarConfig(tile_rows=16, adc_bits=5, adc_range="calibrated", **FAST))
    by_batch = calibrate(again2, [images])
    assert by_items.keys() == by_batch.keys() and all(torch.equal(by_items[k], by_batch[k]) for k in by_items)


def test_calibrate_refuses_one_pair_and_single_images():
    """calibrate(emu, (images, labels)) read the pair as two batches and ran the labels through the model; a
    single [C, H, W] image failed deep inside timm ('not enough values to unpack'). Both are refused by name,
    before any layer records a range; the forms that are batches still run."""
    cfg = CrossbarConfig(adc_bits=6, adc_range="calibrated", tile_rows=16, **FAST)
    model = tiny_vit()
    images, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 0])
    emu = emulate(model, cfg)
    pair = r"one \(inputs \[3, 1, 8, 8\], labels \[3\]\) pair.*\[\(inputs, labels\)\]"
    with pytest.raises(far.ConfigError, match=pair):
        calibrate(emu, (images, labels))
    with pytest.raises(far.ConfigError, match=r"batch 0 has shape \[1, 8, 8\].*\[B, 1, 8, 8\]; a single image"):
        calibrate(emu, images[0])
    with pytest.raises(far.ConfigError, match=r"batch 1 has 9x9x1 images"):
        calibrate(emu, [images, torch.randn(2, 1, 9, 9)])
    assert all(layer.adc_range is None for _, layer in crossbar_layers(emu))
    want = calibrate(emulate(model, cfg), images)
    for form in ([(images, labels)], [images], torch.utils.data.TensorDataset(images, labels)):
        got = calibrate(emulate(model, cfg), form)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_calibrate_skips_empty_batches_and_refuses_no_images():
    """A batch of zero images records nothing: it used to count as calibration data, so every layer silently got
    r = p_max; now it is skipped, and data with no image at all is refused."""
    cfg = CrossbarConfig(adc_bits=6, adc_range="calibrated", tile_rows=16, **FAST)
    model = tiny_vit()
    images = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(emulate(model, cfg), images[:0])
    with_empty = calibrate(emulate(model, cfg), [images[:0], images, images[:0]])
    plain = calibrate(emulate(model, cfg), images)
    assert with_empty.keys() == plain.keys() and all(torch.equal(with_empty[k], plain[k]) for k in plain)
    assert (plain["head"] < cfg.p_max).all()  # real data sets a range below the full scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_calibrate_casts_batches_to_the_model_dtype(dtype):
    """A half-precision model calibrated on fp32 images (what a DataLoader or far's datasets give): the batches are
    cast to the model's dtype, as far.evaluate does (calibrate used to fail in the patch embedding: "Input type
    (float) and bias type ... should be the same"), and the ranges equal those from batches cast by hand."""
    cfg = CrossbarConfig(adc_bits=6, adc_range="calibrated", tile_rows=16, **FAST)
    model = tiny_vit().to(dtype)
    images = torch.randn(3, 1, 8, 8)
    got = calibrate(emulate(model, cfg), images)
    want = calibrate(emulate(model, cfg), images.to(dtype))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _top_slice_never_read(n_out, k, seed):
    """Weights [n_out, k] whose only entries with the top magnitude bit (|w_q| >= 64 of 127) sit in column 0, and
    inputs that never drive column 0: the top weight slice's partial sums are all 0, the others are not."""
    torch.manual_seed(seed)
    w = torch.empty(n_out, k).uniform_(-0.3, 0.3)
    w[:, 0] = 1.0
    x = torch.randn(16, k)
    x[:, 0] = 0
    return w, x


def test_calibrated_range_per_layer_is_the_max_of_what_was_seen():
    """per_slice=False: r = the max over weight slices of the recorded maxima (design: "or their max, or p_max if it
    saw only zeros"). A slice that saw only zeros used to be set to p_max before the max was taken, so the whole
    layer (a CrossbarLinear, a grouped member, an attention product) silently went back to the full range."""
    cfg = CrossbarConfig(adc_bits=6, adc_range="calibrated", tile_rows=8)
    w, x = _top_slice_never_read(3, 8, seed=0)
    lin = nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    seen = far_kernels.crossbar_partial_sum_absmax(x, far_kernels.program_crossbar(w, cfg))
    assert seen[-1] == 0 and (seen[:-1] > 0).all() and seen.max() < cfg.p_max  # the case in question
    emu = emulate(nn.Sequential(lin), cfg)
    assert torch.equal(calibrate(emu, x)["0"], seen.max())
    per_slice = calibrate(emulate(nn.Sequential(lin), cfg), x, per_slice=True)["0"]
    assert torch.equal(per_slice, torch.where(seen > 0, seen, torch.full_like(seen, float(cfg.p_max))))
    # a group member
    xg = CrossbarGroupLinear(GroupLinear(["a"], [w]), cfg, [True], [0])
    xg.begin_calibration()
    xg(x[None])
    assert torch.equal(xg.end_calibration(False)["a"], seen.max())
    # an attention product: q read through K programmed per (image, head)
    xa = CrossbarAttention(tiny_vit().blocks[0].attn, cfg)
    xa.begin_calibration()
    xa._scores(x.view(1, 1, 16, 8), w.view(1, 1, 3, 8))
    assert torch.equal(xa.end_calibration(False)["qk"], seen.max())
    # nothing but zeros anywhere: the full range
    emu = emulate(nn.Sequential(lin), cfg)
    assert calibrate(emu, torch.zeros(2, 8))["0"] == cfg.p_max


def test_per_slice_ranges_have_one_value_per_slice_also_for_one_slice():
    """calibrate(..., per_slice=True) gives every product [S] ranges; with S = 1 (weight_bits=2, 1-bit cells) a
    CrossbarLinear returned a 0-dim tensor (the stored scalar) where group members and attention products give [1]."""
    cfg = CrossbarConfig(weight_bits=2, cell_bits=1, adc_bits=6, adc_range="calibrated", tile_rows=8)
    assert cfg.n_weight_slices == 1
    model = far.convert(tiny_vit(embed_dim=8), hidden_sizes=[[[4, 3], [0, 2]]], blocks=[0])
    ranges = calibrate(emulate(model, cfg, dynamic="crossbar"), torch.randn(2, 1, 8, 8), per_slice=True)
    kinds = {n.rsplit(".", 1)[-1] if n.endswith((".qk", ".pv")) else "group" if ".w_" in n else "linear"
             for n in ranges}
    assert kinds == {"qk", "pv", "group", "linear"}
    assert {tuple(r.shape) for r in ranges.values()} == {(1,)}


@pytest.mark.parametrize("what", ["far-separate", "far-fused", "vit-digital", "vit-crossbar", "vit-digital-tensor"])
def test_emulated_model_takes_an_empty_batch(what):
    """Zero images give zero logits, as the float model does (the FAR block's reshapes with -1 and the per-input
    programming of K and V used to fail on B = 0; with input_scale="tensor", QuantizedAttention's fake_quantize took
    the amax of an empty tensor and raised)."""
    if what.startswith("far"):
        model = far.convert(tiny_vit(), hidden_sizes=[[[4, 3], [0, 2]], 8])
        emu = emulate(model, CrossbarConfig(tile_rows=16, **FAST), lstm_mapping=what[4:])
    else:
        model = tiny_vit()
        scale = "tensor" if what.endswith("-tensor") else "row"
        emu = emulate(model, CrossbarConfig(tile_rows=16, input_scale=scale, **FAST), dynamic=what.split("-")[1])
    x = torch.randn(0, 1, 8, 8)
    with torch.no_grad():
        y = emu(x)
        assert y.shape == model(x).shape == (0, 3)
        assert emu(torch.randn(2, 1, 8, 8)).shape == (2, 3)

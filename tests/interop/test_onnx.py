"""far.export_onnx / `far export`: the ONNX graph (one LSTM op per head and direction, ONNX gate order) run by
onnxruntime gives PyTorch's logits.

Tolerance, derived: the reference is the model in float64; onnxruntime's float32 result may be off by at most
twice what PyTorch's float32 forward is off, plus 64 float32 ulps of the largest logit (the two order their
sums differently; the ulps cover a PyTorch error that happens to be near 0)."""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import far
from far.cli.main import main
from far_kernels.testing import assert_close_derived

try:
    import onnx
    import onnxruntime as ort
except ImportError as e:  # the optional dependencies (make deps installs them)
    pytest.skip(f"onnx / onnxruntime not installed ({e}): pip install onnx onnxruntime", allow_module_level=True)

from far.interop import build_onnx, export_onnx  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def run_ort(path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"pixels": x.numpy()})[0])


def check_logits(model, path, x):
    model = model.eval()
    with torch.no_grad():
        ref = model.double()(x.double())
        out_pt = model.float()(x)
    out = run_ort(path, x)
    err, err_pt = assert_close_derived(out, ref, out_pt, "onnxruntime", tiny=64 * EPS32 * float(ref.abs().max()))
    return err, err_pt


def lstm_ops(proto):
    return [(n.name, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in proto.graph.node
            if n.op_type == "LSTM"]


def tiny_far(hidden_sizes, seed=0):
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=len(hidden_sizes),
                          num_heads=3, num_classes=7)
    far.convert(m, hidden_sizes=hidden_sizes, init="random")
    with torch.no_grad():
        m.cls_token.normal_(0, 0.5)
        m.pos_embed.normal_(0, 0.5)
        for _, fm in far.far_modules(m):
            fm.head_proj_bias.normal_(0, 0.5)
    return m.eval()


def test_zoo_pruned_model(tmp_path):
    model = far.create_model("fmnist_far_tiny_pruned", pretrained=True)
    proto = export_onnx(model, tmp_path / "m.onnx")
    ops = lstm_ops(proto)
    # one op per (head, direction), one bidirectional op where a head keeps as many units each way
    want = 0
    for _, m in far.far_modules(model):
        for h in range(m.num_heads):
            kf, kb = m.hidden_sizes[:, h].tolist()
            want += 1 if kf == kb else (kf > 0) + (kb > 0)
    assert len(ops) == want
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    err, err_pt = check_logits(model, tmp_path / "m.onnx", x)
    assert err < 1e-4


def test_unequal_heads_and_empty_heads(tmp_path):
    sizes = [[[5, 0, 16], [5, 3, 0]], [[0, 0, 7], [0, 0, 2]]]
    model = tiny_far(sizes)
    proto = export_onnx(model, tmp_path / "t.onnx")
    got = sorted((name.split("__")[0], attrs["hidden_size"], attrs["direction"].decode()) for name, attrs in lstm_ops(proto))
    assert got == sorted([
        ("blocks.0.attn.head0.lstm_bidirectional", 5, "bidirectional"),
        ("blocks.0.attn.head1.lstm_reverse", 3, "reverse"),
        ("blocks.0.attn.head2.lstm_forward", 16, "forward"),
        ("blocks.1.attn.head2.lstm_forward", 7, "forward"),
        ("blocks.1.attn.head2.lstm_reverse", 2, "reverse"),
    ])
    for b in (1, 4):
        check_logits(model, tmp_path / "t.onnx", torch.randn(b, 3, 32, 32))


def test_gate_order_by_hand():
    """ONNX W rows are (i, o, f, c) blocks; ours/torch's (i, f, g, o): W_onnx[k:2k] is torch's o rows [3k:4k]."""
    model = tiny_far([[[2, 2, 2], [2, 2, 2]]], seed=3)
    proto = build_onnx(model)
    inits = {i.name.split("__")[0]: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    W, B = inits["blocks.0.attn.head1.W"], inits["blocks.0.attn.head1.B"]
    w_ih, _, b_ih, b_hh = model.blocks[0].attn.lstm_params(1, 1)  # backward direction of head 1
    w_ih, b_ih, b_hh = (t.detach().numpy() for t in (w_ih, b_ih, b_hh))
    assert W.shape == (2, 8, 16) and B.shape == (2, 16)
    k = 2
    for onnx_gate, torch_gate in enumerate((0, 3, 1, 2)):
        np.testing.assert_array_equal(W[1, onnx_gate * k:(onnx_gate + 1) * k], w_ih[torch_gate * k:(torch_gate + 1) * k])
        np.testing.assert_array_equal(B[1, 8 + onnx_gate * k:8 + (onnx_gate + 1) * k],
                                      b_hh[torch_gate * k:(torch_gate + 1) * k])
    np.testing.assert_array_equal(B[1, :2], b_ih[:2])


def test_fixed_batch_and_attention_blocks(tmp_path):
    teacher = far.create_model("fmnist_deit_tiny", pretrained=True)  # attention blocks export too
    proto = export_onnx(teacher, tmp_path / "a.onnx", batch_size=2)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert not lstm_ops(proto)
    check_logits(teacher, tmp_path / "a.onnx", torch.randn(2, 1, 28, 28))
    with pytest.raises(far.ConfigError, match="batch_size must be a positive int"):
        build_onnx(teacher, batch_size=0)


def test_unsupported_model_refused():
    with pytest.raises(far.ConfigError, match="not a timm VisionTransformer"):
        build_onnx(torch.nn.Linear(3, 3))


def _randomized(m, seed=1):
    """Tokens and position embeddings away from their zero init (a wrong token order or pooling shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.split(".")[-1] in ("cls_token", "dist_token", "reg_token", "pos_embed", "head_proj_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


@pytest.mark.parametrize("variant", ["distilled", "pool_include_prefix", "no_pos_embed"])
def test_vit_variants_export_what_torch_computes(tmp_path, variant):
    # a distilled DeiT wrote a graph onnxruntime could not run (17 tokens against an 18-row pos_embed);
    # pool_include_prefix averaged without the prefix tokens; pos_embed='none' crashed
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    if variant == "distilled":
        m = VisionTransformerDistilled(**kw)
    elif variant == "pool_include_prefix":
        m = VisionTransformer(**kw, global_pool="avg", reg_tokens=2, pool_include_prefix=True)
    else:
        m = VisionTransformer(**kw, pos_embed="none")
    far.convert(m, blocks=[1], init="random")  # block 0 keeps its attention
    m = _randomized(m)
    export_onnx(m, tmp_path / "m.onnx")
    check_logits(m, tmp_path / "m.onnx", torch.randn(3, 3, 32, 32))


def test_post_norm_blocks_are_refused():
    # ResPostBlock computes x + norm1(attn(x)); it was exported as a pre-norm block, silently wrong
    from timm.models.vision_transformer import ResPostBlock

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7,
                          block_fn=ResPostBlock)
    with pytest.raises(far.ConfigError, match="blocks.0: ResPostBlock is not exportable"):
        build_onnx(m)


def test_cli_export(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.onnx"
    assert main(["export", "fmnist_far_tiny_pruned", "-o", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert "LSTM ops" in text and "check: onnxruntime vs torch, max |difference|" in text
    err = float(text.split("max |difference| ")[1].split()[0])
    assert err < 1e-4
    assert main(["export", "fmnist_far_tiny_pruned", "-o", str(out)]) == 2  # exists: needs -f
    assert "exists" in capsys.readouterr().err
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["export", "fmnist_far_tiny_pruned", "-o", str(out), "-f", "-q", "--batch-size", "1",
                 "--threads", "1"]) == 0
    assert threads[:1] == [1]  # (main restores the previous count after)
    # ONNX under a checkpoint's name: refused before any work, nothing written
    wrong = tmp_path / "p.safetensors"
    assert main(["export", "fmnist_far_tiny_pruned", "-o", str(wrong)]) == 2
    assert "writes an ONNX graph, but the name's suffix says a far checkpoint; name it .onnx" in capsys.readouterr().err
    assert not wrong.exists()


def test_cli_check_of_a_batch_too_large_for_memory_is_a_user_error(tmp_path, capsys):
    """--check runs one batch of a fixed --batch-size: 10^15 images (3 EB) ended in the allocator's traceback."""
    out = tmp_path / "p.onnx"
    assert main(["export", "fmnist_far_tiny_pruned", "-o", str(out), "--batch-size", str(10**15), "--check", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("far: error: --check runs one batch of --batch-size 1000000000000000 images") and \
        err.count("\n") == 1, err


def test_cli_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # import onnx -> ImportError
    assert main(["export", "fmnist_far_tiny_pruned", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "pip install onnx onnxruntime" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_gated_attention_is_refused():
    # timm's Attention(gated=True) multiplies its output by sigmoid(gate(x)) before proj; the exporter wrote it
    # as plain attention, and onnxruntime's logits differed from torch's with no error
    from timm.layers import Attention

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    m.blocks[1].attn = Attention(48, num_heads=3, qkv_bias=True, gated=True)
    with pytest.raises(far.ConfigError, match=r"blocks\.1\.attn: gated attention .* is not exportable"):
        build_onnx(m.eval())


def test_gated_mlp_is_refused_with_a_clear_message():
    # timm's GluMlp has fc1, act and fc2 like Mlp but multiplies half of fc1's output by act(the other half): it
    # was written as Mlp, and onnx's checker failed on a MatMul's dimensions instead of naming the module
    from timm.layers import GluMlp

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=7,
                          mlp_layer=GluMlp, act_layer=torch.nn.GELU)
    with pytest.raises(far.ConfigError, match=r"blocks\.0\.mlp: GluMlp is not exportable"):
        build_onnx(m.eval())


def test_weights_above_the_protobuf_limit_go_to_an_external_data_file(tmp_path, monkeypatch):
    """Protobuf cannot serialize 2 GiB: larger weights are written beside the graph (ONNX external data) and
    onnxruntime reads them by name. The limit is lowered here so a tiny model takes that path."""
    import far.interop.onnx_export as oe

    model = tiny_far([[[5, 0, 16], [5, 3, 0]], [[16, 16, 16], [16, 16, 16]]])
    inline = build_onnx(model)
    monkeypatch.setattr(oe, "INLINE_LIMIT", 1000)
    path = tmp_path / "big.onnx"
    export_onnx(model, path)
    data = tmp_path / "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert path.stat().st_size < data.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    loaded = onnx.load(str(path))  # reads the data file back: the same weights, bit for bit
    got = {t.name: onnx.numpy_helper.to_array(t) for t in loaded.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in inline.graph.initializer}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    check_logits(model, path, x)
    with pytest.raises(Exception, match="exists"):  # force=False refuses before writing the data file
        data.unlink()
        export_onnx(model, path, force=False)
    assert not data.exists()


@pytest.mark.parametrize("before", ["export", "nothing"])
def test_external_data_export_that_fails_at_the_graph_leaves_the_previous_pair(tmp_path, monkeypatch, before):
    """The data file must replace the old one before the graph can be checked beside it; if the graph then
    fails, the previous export's data file is put back (its graph still reads the weights it was written
    with), or, with no previous export, the new data file is removed."""
    onnx = pytest.importorskip("onnx")
    import far.interop.onnx_export as oe

    monkeypatch.setattr(oe, "INLINE_LIMIT", 1000)
    path = tmp_path / "big.onnx"
    old_model = tiny_far([[[5, 0, 16], [5, 3, 0]], [[16, 16, 16], [16, 16, 16]]])
    if before == "export":
        export_onnx(old_model, path)
        assert (tmp_path / "big.onnx.data").is_file()
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new_model = tiny_far([[[16, 16, 16], [16, 16, 16]], [[16, 16, 16], [16, 16, 16]]])

    def broken(*a, **k):
        raise RuntimeError("graph check failed")
    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(RuntimeError, match="graph check failed"):
        export_onnx(new_model, path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # no temp, no backup link left
    monkeypatch.undo()
    if before == "export":
        onnx.checker.check_model(str(path), full_check=True)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        check_logits(old_model, path, x)

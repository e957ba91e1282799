"""far.interop.public: the authors' public checkpoints (dense MultiHeadLstm / per-head ParallelLSTM layouts,
re-created in public_layout.py) import into FARAttention with the same function.

Tolerance, derived: the reference is the public module in float64; our module in float32 may be off by at most
twice what the public module itself is off in float32 (same operations, other summation order), plus 1e-6.
In float64 both agree to that bound scaled by eps64 / eps32."""

import pytest
import torch

import far
from far.interop import PublicImportReport, import_public, public_attention, read_public
from far_kernels.testing import assert_close_derived, max_err
from public_layout import DenseMultiHeadLstm, ParallelHeadsLstm, as_their_module, public_vit

EPS_RATIO = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps


def check_same(ours, theirs, x):
    theirs64 = theirs.double()
    with torch.no_grad():
        ref = theirs64(x.double())
        out_pt = theirs.float()(x.float())
        out = ours.float()(x.float())
        assert_close_derived(out, ref, out_pt, "fp32")
        out64 = ours.double()(x.double())
    err_pt = max_err(out_pt, ref)
    assert max_err(out64, ref) <= 2 * err_pt * EPS_RATIO + 1e-13
    return max_err(out, ref)


def test_dense_layout_matches():
    torch.manual_seed(0)
    pub = DenseMultiHeadLstm(48, 3).eval()
    sd = pub.state_dict()
    assert tuple(sd["lstm.weight_ih_l0"].shape) == (4 * 48, 48)
    assert tuple(sd["head_proj.weight"].shape) == (48, 96)
    ours = public_attention(sd)
    assert ours.num_heads == 3 and ours.head_dim == 16 and ours.hidden_sizes.tolist() == [[16] * 3] * 2
    check_same(ours, pub, torch.randn(2, 7, 48))
    # FARAttention.from_public is the same importer
    check_same(far.FARAttention.from_public(sd), pub, torch.randn(3, 5, 48))


def test_per_head_parameters_by_hand():
    """Head 1, backward, gate f, unit 2 of the dense LSTM is row 1*C + 1*d + 2 of weight_ih_l0_reverse,
    columns d:2d; in ours: lstm_params(1, 1)[0] row 1*d + 2."""
    torch.manual_seed(1)
    pub = DenseMultiHeadLstm(12, 3)
    ours = public_attention(pub.state_dict())
    C, d = 12, 4
    w_ih = ours.lstm_params(1, 1)[0]
    assert torch.equal(w_ih[1 * d + 2], pub.lstm.weight_ih_l0_reverse[1 * C + 1 * d + 2, d:2 * d])
    w, _ = ours.head_proj_params(2)
    assert torch.equal(w[:, d:], pub.head_proj.weight[2 * d:3 * d, C + 2 * d:C + 3 * d])


def test_head_count_inferred_and_checked():
    torch.manual_seed(2)
    pub = DenseMultiHeadLstm(24, 4)
    assert public_attention(pub.state_dict()).num_heads == 4  # 8 heads would need zeros that are not there
    assert public_attention(pub.state_dict(), num_heads=2).num_heads == 2  # a coarser split holds exactly
    with pytest.raises(far.CheckpointError, match="not block-diagonal over num_heads=8"):
        public_attention(pub.state_dict(), num_heads=8)
    dense = DenseMultiHeadLstm(24, 1).state_dict()
    assert public_attention(dense).num_heads == 1


def test_parallel_layout_matches():
    torch.manual_seed(3)
    pub = ParallelHeadsLstm(30, 3).eval()
    ours = public_attention(pub.state_dict())
    assert ours.hidden_sizes.tolist() == [[10] * 3] * 2
    check_same(ours, pub, torch.randn(2, 6, 30))


def test_parallel_layout_with_two_layer_lstms_refused():
    # the dense form refused a 2-layer LSTM; the per-head form imported layer 0 alone, a different function
    pub = ParallelHeadsLstm(30, 3)
    pub.lstms[1] = torch.nn.LSTM(10, 10, num_layers=2, bidirectional=True, batch_first=True)
    with pytest.raises(far.ConfigError, match=r"'lstms\.1': a multi-layer LSTM"):
        public_attention(pub.state_dict())


def pruned_dense(zero_bias: bool):
    torch.manual_seed(4)
    pub = DenseMultiHeadLstm(24, 3).eval()  # d = 8
    pub.prune_units(0, [0, 3, 9, 16, 17, 18, 19, 20, 21, 22, 23], zero_bias)  # head 2 forward: all 8 units
    pub.prune_units(1, [1, 8, 9, 10], zero_bias)
    return pub


def test_pruned_units_silenced_compact_exactly():
    pub = pruned_dense(zero_bias=True)
    for mode in ("exact", "mask"):
        rep = PublicImportReport()
        ours = public_attention(pub.state_dict(), pruned=mode, report=rep)
        assert ours.hidden_sizes.tolist() == [[6, 7, 0], [7, 5, 8]]
        assert rep.rows[0]["masked"] == [[2, 1, 8], [1, 3, 0]] and rep.bound == 0.0
        check_same(ours, pub, torch.randn(2, 9, 24))


def test_pruned_units_with_live_biases():
    """Their pruning leaves biases: a pruned unit still emits a token-dependent constant. "exact" keeps it;
    "mask" drops it and its effect stays within the reported bound."""
    pub = pruned_dense(zero_bias=False)
    rep = PublicImportReport()
    exact = public_attention(pub.state_dict(), pruned="exact", report=rep)
    assert exact.hidden_sizes.tolist() == [[8] * 3] * 2 and rep.rows[0]["kept_live"] == 15
    x = torch.randn(2, 9, 24)
    check_same(exact, pub, x)
    rep = PublicImportReport()
    masked = public_attention(pub.state_dict(), pruned="mask", report=rep)
    assert masked.hidden_sizes.tolist() == [[6, 7, 0], [7, 5, 8]] and rep.rows[0]["dropped_live"] == 15
    with torch.no_grad():
        change = max_err(masked.double()(x.double()), pub.double()(x.double()))
    assert 0 < change <= rep.bound * (1 + 1e-9)


def test_bad_inputs():
    pub = DenseMultiHeadLstm(12, 3)
    sd = pub.state_dict()
    with pytest.raises(far.ConfigError, match="pruned must be one of"):
        public_attention(sd, pruned="all")
    with pytest.raises(far.CheckpointError, match="no public FAR attention"):
        public_attention(sd, "blocks.0.attn.")
    bad = dict(sd)
    bad["head_proj.weight"] = bad["head_proj.weight"][:, :20]
    with pytest.raises(far.CheckpointError, match="head_proj.weight"):
        public_attention(bad)


@pytest.mark.parametrize("key", ["pre_proj.bias", "post_proj.bias"])
def test_a_projection_bias_of_another_shape_is_refused(key):
    # the biases were copied unchecked: a [1] tensor was broadcast over every channel, a silent wrong import
    sd = dict(DenseMultiHeadLstm(12, 3).state_dict())
    sd[key] = torch.ones(1)
    with pytest.raises(far.CheckpointError, match=rf"tensor '{key}' has shape \[1\], expected \[12\]"):
        public_attention(sd)


def test_whole_model_state_dict_and_files(tmp_path):
    pub = public_vit()
    pub.blocks[1].attn.prune_units(0, [0, 1, 2], zero_bias=True)
    sd = pub.state_dict()
    model = import_public(sd)
    assert [b.attn.hidden_sizes.tolist() for b in model.blocks] == [[[16] * 3] * 2, [[13, 16, 16], [16] * 3]]
    x = torch.randn(2, 3, 32, 32)
    err = check_same(model, pub, x)
    assert err < 1e-3
    # their training checkpoint: {"model": state_dict, ..., "args": Namespace} -> needs allow_pickle
    import argparse

    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(rep_by="multi-lstm")}, ckpt)
    with pytest.raises(far.CheckpointError, match="allow_pickle=True"):
        import_public(ckpt)
    check_same(import_public(ckpt, allow_pickle=True), pub, x)
    torch.save(sd, tmp_path / "sd.pth")  # a plain state_dict loads with weights_only
    check_same(import_public(tmp_path / "sd.pth"), pub, x)
    # and round-trips through far.save / far.load
    far.save(model.float(), tmp_path / "imported.safetensors")
    check_same(far.load(tmp_path / "imported.safetensors"), pub, x)


def test_pickled_whole_model_without_their_code(tmp_path):
    """torch.save(model) of their classes: loading must not need them (stand-ins keep the tensors)."""
    pub = public_vit(seed=5)
    cls, forget = as_their_module(DenseMultiHeadLstm)
    try:
        for blk in pub.blocks:
            blk.attn.__class__ = cls
        torch.save(pub, tmp_path / "far_model.pth")
    finally:
        forget()
    sd = read_public(tmp_path / "far_model.pth", allow_pickle=True)
    assert set(sd) == set(pub.state_dict())
    check_same(import_public(tmp_path / "far_model.pth", allow_pickle=True), pub, torch.randn(2, 3, 32, 32))


def test_partial_models_refused():
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    m.blocks[0].attn = DenseMultiHeadLstm(48, 3)
    with pytest.raises(far.ConfigError, match=r"blocks \[1\] still hold attention"):
        import_public(m.state_dict())


def test_cli_import_public(tmp_path, capsys, monkeypatch):
    from far.cli.main import main

    pub = public_vit(seed=7)
    pub.blocks[0].attn.prune_units(1, [4, 5])  # live biases: "exact" keeps them, "mask" drops them
    torch.save(pub.state_dict(), tmp_path / "pub.pth")
    out = tmp_path / "imported.safetensors"
    assert main(["import-public", str(tmp_path / "pub.pth"), "-o", str(out)]) == 0
    assert "kept live 2" in capsys.readouterr().out
    check_same(far.load(out), pub, torch.randn(2, 3, 32, 32))
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["import-public", str(tmp_path / "pub.pth"), "-o", str(out), "-f", "--pruned", "mask",
                 "--threads", "1"]) == 0
    assert threads[:1] == [1]  # (main restores the previous count after)
    text = capsys.readouterr().out
    assert "dropped live 2 (output change <= " in text
    assert far.load(out).blocks[0].attn.hidden_sizes.tolist() == [[16] * 3, [14, 16, 16]]
    assert main(["import-public", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "x.safetensors")]) == 2


def test_read_public_says_what_a_file_is(tmp_path, capsys):
    """A file the safe loader refuses gets --allow-pickle advice only when it is a pickle: a safetensors file
    (a far checkpoint: use it directly), a truncated torch.save zip or legacy stream, an empty or foreign file
    say what they are, with or without allow_pickle."""
    import argparse
    import pathlib

    import safetensors.torch

    from far.cli.main import main

    sd = public_vit(seed=3).state_dict()
    zoo = pathlib.Path(far.__file__).parent / "zoo" / "fmnist_far_tiny.safetensors"
    far.save(far.create_model("fmnist_deit_tiny", embed_dim=12, depth=1, num_heads=3), tmp_path / "far.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "plain.safetensors")
    torch.save(sd, tmp_path / "sd.pth")
    zipped = (tmp_path / "sd.pth").read_bytes()
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pth").read_bytes()
    st = (tmp_path / "plain.safetensors").read_bytes()
    files = {"far.safetensors": None, "plain.safetensors": None, "cut.pth": zipped[:len(zipped) // 2],
             "cut_end.pth": zipped[:-10], "cut_legacy.pth": legacy[:len(legacy) // 2], "cut_legacy5.pth": legacy[:5],
             "cut.safetensors": st[:len(st) // 2], "cut_header.safetensors": st[:40], "empty.pth": b"",
             "text.pth": b"hello, world"}
    import io
    import pickle

    import numpy as np

    npz = io.BytesIO()
    np.savez(npz, a=np.zeros(3))
    files.update({"arrays.npz": npz.getvalue(), "plain.pkl": pickle.dumps({"a": 1})})  # allow_pickle cannot help
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    expect = {"far.safetensors": "already a far checkpoint",
              "plain.safetensors": "a safetensors file, not a torch.save",
              "cut.pth": "truncated or corrupt torch.save file (it starts as a zip archive",
              "cut_end.pth": "truncated or corrupt torch.save",
              "cut_legacy.pth": "truncated or corrupt torch.save file (legacy",
              "cut_legacy5.pth": "truncated or corrupt",
              "cut.safetensors": "a truncated safetensors file",
              "cut_header.safetensors": "a truncated safetensors file",
              "empty.pth": "an empty file", "text.pth": "neither a zip archive nor a pickle",
              "arrays.npz": "a zip archive, not a torch.save file (no data.pkl; members ['a.npy'])",
              "plain.pkl": "a plain pickle (pickle.dump), not a torch.save file"}
    for name, fragment in expect.items():
        for allow in (False, True):
            with pytest.raises(far.CheckpointError) as info:
                read_public(tmp_path / name, allow_pickle=allow)
            assert fragment in str(info.value) and "pickle" not in str(info.value).replace("nor a pickle", "") \
                .replace("legacy pickle", "").replace("plain pickle (pickle.dump)", ""), (name, allow, str(info.value))
    with pytest.raises(far.CheckpointError, match="already a far checkpoint"):
        read_public(zoo)
    # a real pickle keeps the advice
    torch.save({"model": sd, "args": argparse.Namespace(rep_by="multi-lstm")}, tmp_path / "ckpt.pth")
    with pytest.raises(far.CheckpointError, match=r"allow_pickle=True \(far import-public: --allow-pickle\)"):
        read_public(tmp_path / "ckpt.pth")
    assert main(["import-public", str(zoo), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("far: error: ") and "already a far checkpoint" in err and "allow" not in err, err
    assert main(["import-public", str(tmp_path / "cut.pth"), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt torch.save file" in err and "allow" not in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_ddp_prefixed_state_dict_imports_one_attention_too():
    sd = {"module." + k: v for k, v in public_vit().state_dict().items()}  # as DistributedDataParallel saves it
    m = public_attention(sd, "blocks.0.attn.")  # "no public FAR attention here": the prefix was kept
    assert isinstance(m, far.FARAttention)


def test_class_token_with_average_pooling_imports_as_average_pooling():
    # a MAE/BEiT-style fine-tune: cls token, fc_norm and no final norm; it was rebuilt with token pooling
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    pub = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                            global_pool="avg")
    for blk in pub.blocks:
        blk.attn = DenseMultiHeadLstm(48, 3)
    with torch.no_grad():
        pub.cls_token.normal_(0, 0.5)
        pub.pos_embed.normal_(0, 0.5)
    sd = pub.state_dict()
    assert "fc_norm.weight" in sd and "norm.weight" not in sd and "cls_token" in sd
    m = import_public(sd)
    assert m.global_pool == "avg"
    check_same(m, pub.eval(), torch.randn(2, 3, 32, 32))


def test_an_mlp_width_that_float_division_rounds_down_imports(tmp_path):
    # embed 88, MLP 120: int(88 * (120 / 88)) is 119, so the rebuilt timm model had fc1 88 -> 119 and loading the
    # checkpoint's fc1 [120, 88] ended in load_state_dict's size-mismatch RuntimeError
    from timm.layers import Mlp

    pub = public_vit(heads=4, depth=1, dim=88)
    pub.blocks[0].mlp = Mlp(88, 120)
    assert int(88 * (120 / 88)) != 120
    m = import_public(pub.state_dict())
    assert m.blocks[0].mlp.fc1.out_features == 120
    x = torch.randn(2, 3, 32, 32)
    check_same(m, pub.eval(), x)
    far.save(m.float(), tmp_path / "m.safetensors")
    check_same(far.load(tmp_path / "m.safetensors"), pub, x)


def test_tensors_that_do_not_fit_the_rebuilt_vit_are_a_checkpoint_error():
    # the architecture comes from blocks.0 and the embeddings: a later block of another MLP width (or a corrupt
    # tensor) ended in load_state_dict's size-mismatch RuntimeError, a traceback under far import-public
    sd = public_vit().state_dict()
    sd["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.bias"] = torch.zeros(100, 48), torch.zeros(100)
    sd["blocks.1.mlp.fc2.weight"] = torch.zeros(48, 100)
    with pytest.raises(far.CheckpointError, match=r"tensors of other shapes \['blocks\.1\.mlp\.fc1\.weight \[100, 48\] "
                                                  r"\(rebuilt: \[192, 48\]\)"):
        import_public(sd)

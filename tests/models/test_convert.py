"""far.convert on timm ViTs: every attention replaced, W_O reused, parameter report, end to end on every backend."""
import pytest
import timm
import torch

import far
from conftest import cpu_backends, far_block_oracle, max_err, require_backend


def test_convert_deit_tiny_structure_and_report():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    projs = [b.attn.proj for b in model.blocks]
    qkv_v = [b.attn.qkv.weight[2 * 192:].clone() for b in model.blocks]
    attn_params = sum(p.numel() for b in model.blocks for p in b.attn.parameters())
    far.convert(model)
    mods = far.far_modules(model)
    assert len(mods) == 12 and all(isinstance(b.attn, far.FARAttention) for b in model.blocks)
    for b, proj, v in zip(model.blocks, projs, qkv_v):
        assert b.attn.proj is proj  # W_O is the attention's own
        assert torch.equal(b.attn.pre_proj.weight, v)  # init="value"
    rep = model.far_conversion
    assert len(rep.rows) == 12 and rep.attention_total == attn_params
    per_block = 192 * 192 + 192 + 2 * 3 * (4 * 64 * 64 * 2 + 8 * 64) + 3 * (64 * 128 + 64) + 192 * 192 + 192
    assert rep.far_total == 12 * per_block
    assert "total" in rep.table()
    with pytest.raises(ValueError, match="no timm Attention"):
        far.convert(model)


@pytest.mark.parametrize("backend", cpu_backends())
def test_converted_deit_runs_end_to_end(backend):
    require_backend(backend)
    torch.manual_seed(1)
    model = far.create_model("deit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        far.set_backend(model, "torch")
        ref = model(x)
        far.set_backend(model, backend)
        out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert max_err(out, ref) <= 1e-4 * max(1.0, ref.abs().max().item())


def test_pruned_conversion_and_small_model():
    hs = [[[32, 17, 0], [5, 32, 32]]] * 4
    model = far.create_model("fmnist_deit_tiny", hidden_sizes=hs).eval()
    blk = model.blocks[1].attn
    assert blk.hidden_sizes.tolist() == hs[1]
    x = torch.randn(2, 50, 96)
    with torch.inference_mode():
        assert max_err(blk(x), far_block_oracle(blk, x)) < 1e-5
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="hidden_sizes has 2 entries"):
        far.create_model("fmnist_deit_tiny", hidden_sizes=hs[:2])


def test_set_backend_validates_and_unknown_model():
    model = far.create_model("fmnist_deit_tiny")
    with pytest.raises(ValueError, match="unknown backend"):
        far.set_backend(model, "fastest")
    with pytest.raises(ValueError, match="unknown model"):
        far.create_model("not_a_model")


def test_parse_blocks():
    from far.models.convert import parse_blocks

    assert parse_blocks("0-5") == [0, 1, 2, 3, 4, 5]
    assert parse_blocks("4-6, 0,2,2") == [0, 2, 4, 5, 6]
    for bad, msg in [("3-1", "backwards"), ("a", "block list"), ("1-", "block list"), ("", "block list")]:
        with pytest.raises(far.ConfigError, match=msg):
            parse_blocks(bad)


def test_convert_some_blocks_and_pre_proj_init():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    qkv = [b.attn.qkv.weight.detach().clone() for b in model.blocks]
    far.convert(model, blocks=[2, 0], hidden_sizes=[4, 5], pre_proj_init="random")
    kinds = [type(b.attn).__name__ for b in model.blocks]
    assert kinds == ["FARAttention", "Attention", "FARAttention"]
    assert [r[0] for r in model.far_conversion.rows] == ["blocks.0.attn", "blocks.2.attn"]  # model order
    assert model.blocks[0].attn.hidden_sizes.tolist() == [[4] * 3] * 2  # hidden_sizes follow model order
    assert model.blocks[2].attn.hidden_sizes.tolist() == [[5] * 3] * 2
    assert not torch.allclose(model.blocks[0].attn.pre_proj.weight, qkv[0][96:])  # random, not V
    far.convert(model, blocks=["blocks.1.attn"], pre_proj_init="v")
    assert torch.equal(model.blocks[1].attn.pre_proj.weight, qkv[1][96:])
    for kwargs, msg in [(dict(blocks=[1]), "block 1 has no timm Attention"), (dict(blocks=[7]), "does not exist"),
                        (dict(blocks=3), "must be a list")]:
        with pytest.raises(far.ConfigError, match=msg):
            far.convert(model, **kwargs)
    fresh = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(far.ConfigError, match="pre_proj_init must be 'v'"):
        far.convert(fresh, pre_proj_init="value-ish")
    with pytest.raises(far.ConfigError, match="hidden_sizes has 2 entries but 1"):
        far.convert(fresh, blocks=[0], hidden_sizes=[4, 4])
    with pytest.raises(far.ConfigError, match="not both"):
        far.convert(fresh, init="value", pre_proj_init="v")
    v = fresh.blocks[0].attn.qkv.weight[96:].detach().clone()
    far.convert(fresh, init="value")  # the older spelling
    assert torch.equal(fresh.blocks[0].attn.pre_proj.weight, v)


@pytest.mark.parametrize("change", ["scale_norm", "gate"])
def test_unconvertible_attention_is_a_config_error_and_nothing_converts(change):
    """An attention FAR cannot replace (timm's scale_norm, a gate) is a user's choice of model: a ConfigError,
    which `far convert` / `far distill` print as one line, and no block is replaced before it is found."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    last = model.blocks[2].attn
    if change == "scale_norm":
        last.norm = torch.nn.LayerNorm(16)
    else:
        last.gate = torch.nn.Linear(48, 48)
    with pytest.raises(far.ConfigError, match="blocks.2.attn: .* not supported by FAR conversion"):
        far.convert(model)
    assert [type(b.attn).__name__ for b in model.blocks] == ["Attention"] * 3
    assert not hasattr(model, "far_conversion")


def test_far_convert_refuses_scale_norm_attention_in_one_line(tmp_path, capsys):
    from far.cli.main import main

    out = tmp_path / "sn.safetensors"
    rc = main(["convert", "vit_tiny_patch16_224", "--model-kwargs", "scale_attn_norm=true,depth=1", "-o", str(out),
               "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("far: error: blocks.0.attn: attention with scale_norm is not supported")
    assert not out.exists()

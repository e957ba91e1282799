"""What FARAttention and the model helpers promise around the forward: input dtypes under autocast, hidden_sizes
that cannot disagree with the tensors, storage changes under inference mode, padding zeroed whatever it held,
and the save/load paths of models built outside far.create_model."""
import copy
import pickle

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import far
from far.errors import ConfigError
from far.nn import FARAttention


def test_autocast_input_of_the_autocast_dtype_is_taken():
    # timm's Attention takes a bf16 activation made under autocast; FARAttention refused it ("use torch.autocast")
    torch.manual_seed(0)
    m, lin = FARAttention(12, 3), torch.nn.Linear(12, 12)
    x = torch.randn(2, 5, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        y = m(h)
    with torch.no_grad():
        ref = m(h.float())
    tol = 16 * torch.finfo(torch.bfloat16).eps * float(ref.abs().max())  # bf16 products, fp32 reference
    assert float((y.float() - ref).abs().max()) <= tol
    with pytest.raises(TypeError, match="x is torch.bfloat16 but the module is torch.float32"):
        m(h)  # outside autocast the dtype must match


def test_hidden_sizes_of_a_ragged_block_cannot_change():
    m = FARAttention(12, 3, hidden_sizes=[[4, 3, 2], [1, 4, 4]]).set_storage("ragged")
    with pytest.raises(ValueError, match="ragged storage cannot change"):
        m.hidden_sizes = [[4, 4, 4], [4, 4, 4]]  # the forward gathered from the wrong rows, silently
    m.hidden_sizes = m.hidden_sizes.clone()  # the same sizes: fine
    p = m.set_storage("padded")
    with pytest.raises(ValueError, match="exceed the padded width 4"):
        p.hidden_sizes = 5
    with pytest.raises(ValueError, match="shape \\[2, num_heads\\]"):
        p.hidden_sizes = [1, 2, 3]
    p.hidden_sizes = [[1, 1, 1], [2, 2, 2]]  # a mask shrinking it in padded storage, as pruning does
    assert p.hidden_sizes.dtype == torch.int64 and p.hidden_sizes.tolist() == [[1, 1, 1], [2, 2, 2]]
    assert copy.deepcopy(p).hidden_sizes.tolist() == pickle.loads(pickle.dumps(p)).hidden_sizes.tolist()


def test_set_storage_under_inference_mode_keeps_a_trainable_module():
    m = FARAttention(12, 3, hidden_sizes=[[4, 3, 2], [1, 4, 4]])
    with torch.inference_mode():
        m.set_storage("ragged")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(2, 5, 12)).sum().backward()
    opt.step()  # "Inplace update to inference tensor" before


def test_zero_padding_clears_nan_and_inf():
    m = FARAttention(12, 3, hidden_sizes=[[4, 3, 2], [1, 4, 4]])
    with torch.no_grad():
        m.head_proj_weight[0, :, 3].fill_(float("nan"))  # a padded column (head 0's forward keeps 4 of 4: index 3 kept)
        m.head_proj_weight[2, :, 2].fill_(float("inf"))  # head 2 forward keeps 2: column 2 is padding
        m.w_hh[1, 0, -1].fill_(float("nan"))  # head 1 forward keeps 3: the last gate row is padding
    m.zero_padding_()
    assert torch.isnan(m.head_proj_weight[0, :, 3]).all()  # kept: untouched
    assert (m.head_proj_weight[2, :, 2] == 0).all() and (m.w_hh[1, 0, -1] == 0).all()


def test_convert_refuses_a_bad_table_before_any_block_changes():
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=12, depth=3, num_heads=3, num_classes=2)
    with pytest.raises(ConfigError, match=r"hidden_sizes entry 2 \(blocks.2.attn\): .*shape \[2, num_heads\]"):
        far.convert(m, hidden_sizes=[4, 4, [[1, 2], [3, 4]]])
    assert not far.far_modules(m)  # two blocks were converted before the error


def test_zoo_model_refuses_blocks():
    with pytest.raises(ConfigError, match="blocks, pre_proj_init"):
        far.create_model("fmnist_far_tiny", blocks=[0])


def test_non_square_patches_save_and_load(tmp_path):
    m = far.create_model("fmnist_deit_tiny", far=False, embed_dim=12, depth=1, num_heads=3, patch_size=(7, 4))
    far.save(m, tmp_path / "m.safetensors")
    r = far.load(tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(r(x), m.eval()(x))


def test_load_then_save_keeps_the_metadata(tmp_path):
    m = far.create_model("fmnist_deit_tiny", far=True, embed_dim=12, depth=1, num_heads=3)
    far.save(m, tmp_path / "a.safetensors", metadata={"teacher": "deit", "pruning": {"ratio": 0.3}})
    far.save(far.load(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    assert far.load(tmp_path / "b.safetensors").far_checkpoint["metadata"] == {"teacher": "deit",
                                                                                 "pruning": {"ratio": 0.3}}


@pytest.mark.parametrize("init_values", [None, 0.1])
@pytest.mark.parametrize("plan", [{2: 1}, {1: 0}])
def test_a_reuse_model_built_with_timm_saves_and_loads(tmp_path, init_values, plan):
    # far.save read a reuse source's tap as a module the architecture lacks (only far.create_model models saved)
    from far.nn import apply_reuse

    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=12, depth=3, num_heads=3, num_classes=2,
                          init_values=init_values).eval()
    if init_values:
        with torch.no_grad():
            for blk in m.blocks:
                blk.ls1.gamma.normal_()
    apply_reuse(m, plan)
    far.save(m, tmp_path / "r.safetensors")
    r = far.load(tmp_path / "r.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(r(x), m(x))


def test_param_counts_see_through_wrappers():
    # under DataParallel / DDP the token mixers were not found (getattr(wrapper, "blocks") is absent): mixer_* were 0
    from far.models import param_counts

    m = far.create_model("fmnist_deit_tiny", far=True, embed_dim=12, depth=2, num_heads=3)
    wrapped = torch.nn.DataParallel(m)
    assert param_counts(wrapped) == param_counts(m) and param_counts(m)["mixer_kept"] > 0

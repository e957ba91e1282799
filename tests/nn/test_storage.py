"""FARAttention's two storages: "ragged" (kept units only, the checkpoint's layout) computes exactly what
"padded" computes, on every backend, in value and gradient, and every reader and writer of the parameters
(per-head accessors, checkpoints, pruning, the emulator, ONNX export) works on it."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import far
from conftest import cpu_backends, far_block_oracle, max_err, require_backend
from far.errors import ConfigError
from far.methods.prune import GROUPS, apply_keep_mask, compact_, group_norms
from far.nn.far_attention import STORAGES

SIZES = [[5, 0, 8, 3], [7, 2, 8, 0]]  # ragged heads, an empty direction, a full head


def block(hidden_sizes=SIZES, seed=0, dtype=torch.float32, C=32, H=4):
    torch.manual_seed(seed)
    m = far.FARAttention(C, H, hidden_sizes=hidden_sizes).eval()
    with torch.no_grad():
        m.b_ih.add_(0.1 * torch.randn_like(m.b_ih))
        m.head_proj_bias.add_(0.3 * torch.randn_like(m.head_proj_bias))
        m.zero_padding_()
    return m.to(dtype)


def ragged(m):
    return copy.deepcopy(m).set_storage("ragged")


def tiny_vit(sizes, seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=16, patch_size=8, in_chans=1, embed_dim=32, depth=len(sizes), num_heads=4,
                              num_classes=5)
    far.convert(model, hidden_sizes=sizes, init="random")
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_ragged_forward_is_the_padded_forward(backend, dtype):
    """Same kernel operands (gathered, zero at padded units) -> bit-identical outputs; both equal the float64
    per-head torch.nn.LSTM oracle within the backend's usual error."""
    require_backend(backend)
    m = block(dtype=dtype)
    r = ragged(m)
    x = torch.randn(3, 9, 32).to(dtype)
    with torch.inference_mode():
        a, b = m(x, backend=backend), r(x, backend=backend)
    assert torch.equal(a, b)
    if dtype == torch.float32:
        assert max_err(b, far_block_oracle(r, x)) < 2e-5
    for got, want in zip(r.padded_params(), m.padded_params()):
        assert got.dtype == dtype and torch.equal(got, want)


def test_ragged_memory_is_the_kept_units_and_the_checkpoint_layout():
    m = block()
    r = ragged(m)
    own = {k: v for k, v in r.state_dict().items() if k.startswith(("lstm.", "head_proj."))}
    compact = m.compact_state()
    assert own.keys() == compact.keys() == set(far.FARAttention.COMPACT_KEYS.values())
    for k in own:
        assert torch.equal(own[k], compact[k]), k
    assert sum(p.numel() for p in r.lstm_storage().values()) == m.num_lstm_params()
    assert sum(p.numel() for p in m.lstm_storage().values()) > m.num_lstm_params()  # the padding
    assert "storage=ragged" in repr(r) and "w_ih [" in repr(r)
    assert not hasattr(r, "w_ih") and r.width == 8 and torch.equal(r.unit_mask(), m.unit_mask())


def test_round_trip_keeps_values_flags_and_dtype():
    m = block(dtype=torch.bfloat16)
    m.head_proj_weight.requires_grad_(False)
    back = ragged(m).set_storage("padded")
    assert back.storage == "padded"
    for name in far.FARAttention.COMPACT_KEYS:
        a, b = getattr(m, name), getattr(back, name)
        assert torch.equal(a, b) and a.dtype == b.dtype == torch.bfloat16 and a.requires_grad == b.requires_grad
    assert ragged(m).head_proj.weight.requires_grad is False
    assert m.set_storage("padded") is m  # no-op
    with pytest.raises(ValueError, match="storage must be one of padded, ragged"):
        m.set_storage("dense")
    with pytest.raises(ValueError, match="storage must be one of"):
        far.FARAttention(32, 4, storage="sparse")
    assert STORAGES == ("padded", "ragged")


def test_same_seed_same_initial_block_in_either_storage():
    x = torch.randn(2, 5, 32)
    torch.manual_seed(3)
    a = far.FARAttention(32, 4, hidden_sizes=SIZES)
    torch.manual_seed(3)
    b = far.FARAttention(32, 4, hidden_sizes=SIZES, storage="ragged")
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_ragged_gradients_are_the_padded_gradients_of_the_kept_units():
    m = block(seed=1).double().train()
    r = ragged(m)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    w = torch.randn(2, 6, 32, dtype=torch.float64)
    (m(x) * w).sum().backward()
    (r(x) * w).sum().backward()
    grads = copy.deepcopy(m)  # the padded gradients, compacted through the same layout
    with torch.no_grad():
        for name in far.FARAttention.COMPACT_KEYS:
            getattr(grads, name).copy_(getattr(m, name).grad)
    for key, g in grads.compact_state().items():
        assert max_err(r.get_parameter(key).grad, g) < 1e-12, key
    for name in ("pre_proj.weight", "proj.weight"):
        assert max_err(r.get_parameter(name).grad, m.get_parameter(name).grad) < 1e-12
    opt = torch.optim.SGD(r.parameters(), lr=0.1)  # a step trains only kept units: there are no others
    opt.step()
    assert r.lstm.w_ih.shape[0] == 4 * sum(map(sum, SIZES))


def test_functional_call_swaps_the_ragged_parameters():
    # torch.func.functional_call puts plain tensors where the parameters were (torch.func.grad / jvp over
    # parameters, model ensembling): the ragged block must read them as the padded one does
    m = block(seed=2).double()
    r = ragged(m)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for mod in (m, r):
        params = {k: 2 * v.detach() for k, v in mod.named_parameters()}
        with torch.no_grad():
            want = copy.deepcopy(mod).requires_grad_(False)
            for k, v in want.named_parameters():
                v.copy_(params[k])
            want = want(x)
            got = torch.func.functional_call(mod, params, (x,))
        assert torch.equal(got, want), mod.storage
    grads = torch.func.grad(lambda p: torch.func.functional_call(r, p, (x,)).square().sum())(
        {k: v.detach() for k, v in r.named_parameters()})
    r(x).square().sum().backward()
    for k, p in r.named_parameters():
        assert max_err(grads[k], p.grad) < 1e-12, k


def test_per_head_writers_hit_the_same_units():
    m, r = block(seed=2), ragged(block(seed=2))
    g = torch.Generator().manual_seed(5)
    for head in range(4):
        for direction in (0, 1):
            k = SIZES[direction][head]
            new = [torch.randn(4 * k, 8, generator=g), torch.randn(4 * k, k, generator=g),
                   torch.randn(4 * k, generator=g), torch.randn(4 * k, generator=g)]
            m.set_lstm_params(direction, head, *new)
            r.set_lstm_params(direction, head, *new)
        kk = SIZES[0][head] + SIZES[1][head]
        w, b = torch.randn(8, kk, generator=g), torch.randn(8, generator=g)
        m.set_head_proj_params(head, w, b)
        r.set_head_proj_params(head, w, b)
    for key, t in m.compact_state().items():
        assert torch.equal(r.compact_state()[key], t), key
    with pytest.raises(ValueError, match="w_hh must be"):
        r.set_lstm_params(0, 0, torch.zeros(20, 8), torch.zeros(20, 4), torch.zeros(20), torch.zeros(20))
    before = {k: v.clone() for k, v in r.compact_state().items()}
    bad = dict(before, **{"lstm.w_hh": torch.zeros(3)})
    with pytest.raises(ValueError, match="has shape"):
        r.load_compact_state(bad)
    assert all(torch.equal(before[k], v) for k, v in r.compact_state().items())  # nothing written


def test_every_unit_pruned():
    m = block(hidden_sizes=0)
    r = ragged(m)
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        assert torch.equal(m(x), r(x))
    assert r.lstm.w_ih.shape == (0, 8) and r.head_proj.weight.shape == (8, 0)


def test_checkpoints_load_and_save_in_either_storage(tmp_path):
    model = tiny_vit([SIZES, [[8, 8, 1, 4], [0, 3, 6, 8]]])
    far.save(model, tmp_path / "p.safetensors")
    r = far.load(tmp_path / "p.safetensors", storage="ragged")
    assert all(m.storage == "ragged" for _, m in far.far_modules(r))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), r(x))
    counts = far.models.param_counts(r)
    assert counts["stored"] == counts["kept"] == far.models.param_counts(model)["kept"]
    assert counts["mixer_stored"] == counts["mixer_kept"]
    far.save(r, tmp_path / "r.safetensors")  # the same tensors as the padded model's file
    want, got = far.models.stored_tensors(model), far.models.stored_tensors(r)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    back = far.load(tmp_path / "r.safetensors")
    assert all(m.storage == "padded" for _, m in far.far_modules(back))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    with pytest.raises(ConfigError, match="storage must be one of"):
        far.load(tmp_path / "r.safetensors", storage="compact")
    with pytest.raises(ConfigError, match="storage must be one of"):
        far.set_storage(model, "compact")


def test_pruning_reads_either_storage_and_masks_need_padding():
    m = block(seed=4)
    r = ragged(m)
    for groups in GROUPS:
        assert torch.equal(group_norms(m, groups), group_norms(r, groups))
    keep = group_norms(m) > group_norms(m).median()
    with pytest.raises(ConfigError, match="padded storage"):
        apply_keep_mask(r, keep)
    assert compact_(r) is r and r.storage == "ragged"
    apply_keep_mask(m, keep)
    compact_(m)
    assert m.storage == "padded" and m.width == int(m.hidden_sizes.max())


def test_far_prune_on_a_ragged_model_returns_a_padded_pruned_copy():
    model = far.set_storage(tiny_vit([SIZES, SIZES]), "ragged")
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 16, 16), torch.randint(0, 5, (16,)))
    out = far.prune(model, data, config=far.TrainConfig(epochs=0, batch_size=8), prune_ratio=0.5, finetune_epochs=0)
    assert all(m.storage == "padded" for _, m in far.far_modules(out))
    assert all(m.storage == "ragged" for _, m in far.far_modules(model))  # the input is left as it was
    assert far.models.param_counts(out)["kept"] < far.models.param_counts(model)["kept"]


def test_emulator_and_onnx_read_the_ragged_block():
    from far.imc import emulate
    from far_kernels import CrossbarConfig

    model = tiny_vit([SIZES])
    r = far.set_storage(copy.deepcopy(model), "ragged")
    x = torch.randn(2, 1, 16, 16)
    cfg = CrossbarConfig(tile_rows=16)
    with torch.no_grad():
        assert torch.equal(emulate(model, cfg)(x), emulate(r, cfg)(x))
    onnx = pytest.importorskip("onnx")
    from far.interop import build_onnx

    a, b = build_onnx(model), build_onnx(r)
    ia = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ia.keys() == ib.keys() and all((ia[k] == ib[k]).all() for k in ia)


def test_far_distill_trains_a_ragged_student_in_place_of_its_kept_units():
    teacher = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=2, num_heads=2, num_classes=2)
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, (x.mean((1, 2, 3)) > 0).long())
    student = copy.deepcopy(teacher)
    far.convert(student, hidden_sizes=[[[5, 9], [3, 16]], [[2, 0], [7, 1]]])
    far.set_storage(student, "ragged")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = far.distill(teacher, data, student=student, config=far.TrainConfig(epochs=1, batch_size=16, progress=False),
                      stage2_epochs=1)
    assert [m.storage for _, m in far.far_modules(out)] == ["ragged", "ragged"]
    for block in (0, 1):
        for key in far.FARAttention.COMPACT_KEYS.values():
            name = f"blocks.{block}.attn.{key}"
            assert not torch.equal(out.state_dict()[name], before[name]), name  # every ragged tensor trained


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ragged_forward_on_the_gpu(backend, dtype):
    require_backend(backend, "cuda")
    m = block(hidden_sizes=[[64, 37, 0, 12], [37, 64, 64, 1]], C=256, dtype=dtype).cuda()
    r = ragged(m)
    x = torch.randn(5, 50, 256, device="cuda").to(dtype)
    with torch.inference_mode():
        assert torch.equal(m(x, backend=backend), r(x, backend=backend))
    r.train()
    r(x.float().to(dtype)).float().square().mean().backward()  # training on the GPU: the gather's gradient
    assert r.lstm.w_hh.grad is not None and r.lstm.w_hh.grad.is_cuda

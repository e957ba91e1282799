"""far.save / far.load / far.read_config: bit-exact round trips, compact (kept units only) storage,
a clear CheckpointError for every kind of bad file, atomic writes."""
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import far
import far.checkpoint
import far.utils.fs
from far.nn import FARAttention
from far import CheckpointError

PRUNED = [[[32, 17, 0], [5, 32, 32]]] * 4  # fmnist_deit_tiny: 4 blocks, 3 heads, head_dim 32
META = {"teacher": "fmnist_deit_tiny", "training": {"epochs": 3, "lr": 1e-3}, "pruning": None}


def _model(kind: str, dtype=torch.float32, seed: int = 0):
    """A small model with every parameter random (LayerNorm included), FAR padding exactly 0."""
    if kind == "teacher":
        model = far.create_model("fmnist_deit_tiny", far=False)
    else:
        model = far.create_model("fmnist_deit_tiny", hidden_sizes=PRUNED if kind == "pruned" else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for _, m in far.far_modules(model):
            m.zero_padding_()
    far.set_backend(model, "torch")
    return model.to(dtype).eval()


def _tensors(model):
    return {**{"param." + k: v for k, v in model.named_parameters()},
            **{"buffer." + k: v for k, v in model.named_buffers()}}


def _assert_same_model(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), k
    assert [(n, m.hidden_sizes.tolist()) for n, m in far.far_modules(a)] == \
           [(n, m.hidden_sizes.tolist()) for n, m in far.far_modules(b)]


def _read(path):
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, config=None, tensors=None, keep_digest=False):
    """Re-save src's tensors and metadata after editing them with config(cfg) / tensors(dict)."""
    meta, ts = _read(src)
    cfg = json.loads(meta["far_config"])
    if config is not None:
        cfg = config(cfg) or cfg
    if tensors is not None:
        ts = tensors(ts) or ts
    if isinstance(cfg, dict) and not keep_digest:
        cfg.pop(far.checkpoint.DIGEST_KEY)
    meta["far_config"] = cfg if isinstance(cfg, str) else json.dumps(cfg)
    save_file(ts, dst, metadata=meta)
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, model) of a pruned FP32 FAR model saved once for the bad-file tests."""
    model = _model("pruned")
    path = str(tmp_path_factory.mktemp("ckpt") / "pruned.safetensors")
    far.save(model, path, metadata=META)
    return path, model


# ---- round trips ----
@pytest.mark.parametrize("kind,dtype", [
    pytest.param("dense", torch.float32, id="far-fp32"),
    pytest.param("pruned", torch.float32, id="far-pruned-fp32"),
    pytest.param("pruned", torch.bfloat16, id="far-pruned-bf16"),
    pytest.param("teacher", torch.float32, id="teacher-fp32"),
    pytest.param("teacher", torch.bfloat16, id="teacher-bf16"),
])
def test_round_trip_bit_exact(tmp_path, kind, dtype):
    model = _model(kind, dtype)
    path = tmp_path / "m.safetensors"
    far.save(model, path, metadata=META)
    loaded = far.load(path, backend="torch")
    _assert_same_model(model, loaded)
    assert not loaded.training
    assert loaded.pretrained_cfg == model.pretrained_cfg
    cfg = loaded.far_checkpoint
    assert cfg["format"] == "far-checkpoint" and cfg["format_version"] == 1 and cfg["far_version"] == far.__version__
    assert cfg["metadata"] == META and cfg["architecture"] == {"timm_name": "fmnist_deit_tiny", "kwargs": {}}
    assert cfg == far.read_config(path)
    blocks = cfg["far"]["blocks"]
    if kind == "teacher":
        assert blocks == [] and far.far_modules(loaded) == []
    else:
        assert [b["name"] for b in blocks] == [f"blocks.{i}.attn" for i in range(4)]
        assert all(b["num_heads"] == 3 and b["head_dim"] == 32 for b in blocks)
        assert [b["hidden_sizes"] for b in blocks] == (PRUNED if kind == "pruned" else [[[32] * 3] * 2] * 4)
        assert all(m.backend == "torch" for _, m in far.far_modules(loaded))
    x = torch.randn(3, 1, 28, 28).to(dtype)
    with torch.inference_mode():
        y, y2 = model(x), loaded(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y2)


def test_resave_is_byte_identical(tmp_path, saved):
    path, _ = saved
    far.save(far.load(path), tmp_path / "again.safetensors", metadata=META)
    assert open(path, "rb").read() == open(tmp_path / "again.safetensors", "rb").read()


def test_file_holds_only_kept_units(tmp_path, saved):
    path, model = saved
    _, ts = _read(path)
    for name, m in far.far_modules(model):
        p = name + "."
        for padded in FARAttention.COMPACT_KEYS:
            assert p + padded not in ts
        assert {k: tuple(ts[p + k].shape) for k in m.COMPACT_KEYS.values()} == m.compact_shapes()
        assert tuple(ts[p + "lstm.w_ih"].shape) == (4 * 118, 32)  # 118 kept units of 192
        assert sum(ts[p + k].numel() for k in m.COMPACT_KEYS.values()) == m.num_lstm_params()
    stored = sum(t.numel() for t in ts.values())
    padded = sum(getattr(m, k).numel() for _, m in far.far_modules(model) for k in FARAttention.COMPACT_KEYS)
    compact = sum(m.num_lstm_params() for _, m in far.far_modules(model))
    assert stored == far.count_params(model) - padded + compact < far.count_params(model)
    dense = tmp_path / "dense.safetensors"
    far.save(_model("dense"), dense)
    assert os.path.getsize(path) < os.path.getsize(dense)


def test_fully_pruned_block_round_trips(tmp_path):
    hs = [[[0, 0, 0], [0, 0, 0]]] + PRUNED[1:]
    model = far.create_model("fmnist_deit_tiny", hidden_sizes=hs).eval()
    far.set_backend(model, "torch")
    far.save(model, tmp_path / "z.safetensors")
    loaded = far.load(tmp_path / "z.safetensors", backend="torch")
    _assert_same_model(model, loaded)
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_to_cuda(saved):
    path, model = saved
    loaded = far.load(path, device="cuda")
    assert all(p.is_cuda for p in loaded.parameters())
    _assert_same_model(model, loaded.cpu())


def test_load_refuses_a_device_it_cannot_use(saved):
    """Before the file is read, in words (as the CLI's --device), not torch's driver error."""
    path, _ = saved
    cases = [("foo", "device 'foo'"), ("mps", "device must be cpu or cuda")]
    cases.append(("cuda:99", "CUDA device") if torch.cuda.is_available() else ("cuda", "no CUDA device is available"))
    for device, match in cases:
        with pytest.raises(far.ConfigError, match=match):
            far.load(path, device=device)


# ---- bad files ----
def _raises(path, *needles):
    with pytest.raises(CheckpointError) as e:
        far.load(path)
    msg = str(e.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.safetensors", "no such file")
    with pytest.raises(CheckpointError, match="no such file"):
        far.read_config(tmp_path / "nope.safetensors")
    _raises(tmp_path, "directory")


@pytest.mark.parametrize("where", ["0", "4", "8", "20", "header-1", "header+10", "end-1"])
def test_truncated(tmp_path, saved, where):
    data = open(saved[0], "rb").read()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = {"header-1": header_end - 1, "header+10": header_end + 10, "end-1": len(data) - 1}.get(where)
    path = tmp_path / "t.safetensors"
    path.write_bytes(data[:int(where) if cut is None else cut])
    _raises(path, "truncated")
    with pytest.raises(CheckpointError, match="truncated"):
        far.read_config(path)


@pytest.mark.parametrize("data,needle", [
    pytest.param(bytes(range(256)) * 8, "not a safetensors file", id="random"),
    pytest.param((16).to_bytes(8, "little") + b"this is not json" + b"\0" * 64, "corrupt safetensors header",
                 id="bad-json"),
    pytest.param((2).to_bytes(8, "little") + b"[]", "not a JSON object", id="json-list"),
])
def test_garbage(tmp_path, data, needle):
    path = tmp_path / "g.safetensors"
    path.write_bytes(data)
    _raises(path, needle)


def test_flipped_bytes(tmp_path, saved):
    data = open(saved[0], "rb").read()
    header_end = 8 + int.from_bytes(data[:8], "little")
    positions = [0, 3, 9, 40, header_end // 2, header_end - 30, header_end - 1,  # header
                 header_end, header_end + 1001, len(data) - 1]  # tensor data
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        path = tmp_path / f"flip{pos}.safetensors"
        path.write_bytes(bytes(bad))
        msg = _raises(path)
        if pos >= header_end:
            assert "checksum" in msg, msg
        elif pos >= 8:
            assert "corrupt" in msg, msg


def test_config_edit_caught_by_checksum(tmp_path, saved):
    data = open(saved[0], "rb").read()
    old, new = b'\\"bilinear\\"', b'\\"bicubic!\\"'
    assert data.count(old) == 1
    path = tmp_path / "e.safetensors"
    path.write_bytes(data.replace(old, new))
    _raises(path, "checksum")


def test_tensor_edit_caught_by_checksum(tmp_path, saved):
    def edit(ts):
        ts["head.bias"] = ts["head.bias"] + 1
    _raises(_rewrite(saved[0], tmp_path / "e.safetensors", tensors=edit, keep_digest=True), "checksum")


def test_digest_is_optional(tmp_path, saved):
    path, model = saved
    _assert_same_model(model, far.load(_rewrite(path, tmp_path / "nodigest.safetensors")))


def test_info_verifies_the_checksum(tmp_path, saved, capsys):
    """`far info` reads the tensors too: a damaged file is refused there as by far.load (it looked fine)."""
    from far.cli import main

    def edit(ts):
        ts["head.bias"] = ts["head.bias"] + 1
    assert main(["info", str(saved[0])]) == 0
    assert "checksum     sha256 of the config and tensors verified" in capsys.readouterr().out
    assert main(["info", str(_rewrite(saved[0], tmp_path / "e.safetensors", tensors=edit, keep_digest=True))]) == 2
    assert "checksum" in capsys.readouterr().err
    assert main(["info", str(_rewrite(saved[0], tmp_path / "nodigest.safetensors"))]) == 0
    assert "checksum     none stored (not verified)" in capsys.readouterr().out


def _drop(key):
    def edit(ts):
        del ts[key]
    return edit


@pytest.mark.parametrize("config,tensors,needles", [
    pytest.param(lambda c: "{not json", None, ["far_config", "not valid JSON"], id="config-not-json"),
    pytest.param(lambda c: "[1, 2]", None, ["expected a JSON object"], id="config-not-object"),
    pytest.param(lambda c: c.update(format="onnx"), None, ["wrong format 'onnx'"], id="wrong-format"),
    pytest.param(lambda c: c.update(format_version=2), None,
                 ["format_version 2 is newer", "format_version 1"], id="newer-version"),
    pytest.param(lambda c: c.update(format_version="1"), None, ["invalid format_version"], id="version-type"),
    pytest.param(lambda c: c["architecture"].update(timm_name="no_such_vit"), None,
                 ["unknown architecture 'no_such_vit'"], id="unknown-arch"),
    pytest.param(lambda c: c["architecture"].update(kwargs={"depth": 3}), None,
                 ["cannot rebuild", "4 FAR block(s)"], id="arch-kwargs-mismatch"),
    pytest.param(lambda c: c["architecture"].pop("kwargs"), None, ["architecture must be"], id="arch-no-kwargs"),
    pytest.param(lambda c: c["far"]["blocks"][1].update(name="blocks.9.attn"), None,
                 ["cannot rebuild architecture", "blocks.9.attn"], id="block-name"),
    pytest.param(lambda c: c["far"]["blocks"][0].update(hidden_sizes=[[32, 17], [5, 32]]), None,
                 ["hidden_sizes must be [2][num_heads=3]"], id="hidden-sizes-shape"),
    pytest.param(lambda c: c["far"]["blocks"][2].update(hidden_sizes=[[32, 16, 0], [5, 32, 32]]), None,
                 ["mis-shaped", "blocks.2.attn.lstm.w_ih expected [468, 32], got [472, 32]"],
                 id="hidden-sizes-vs-tensors"),
    pytest.param(None, _drop("blocks.0.attn.lstm.w_ih"), ["1 missing tensor(s): blocks.0.attn.lstm.w_ih"],
                 id="missing-tensor"),
    pytest.param(None, _drop("pos_embed"), ["missing", "pos_embed"], id="missing-plain-tensor"),
    pytest.param(None, lambda ts: ts.update({"extra.weight": torch.ones(2)}),
                 ["1 unexpected tensor(s): extra.weight"], id="extra-tensor"),
    pytest.param(None, lambda ts: ts.update({"blocks.3.attn.w_hh": torch.ones(2)}),
                 ["unexpected", "blocks.3.attn.w_hh"], id="padded-tensor-stored"),
    pytest.param(None, lambda ts: ts.update({"head.weight": torch.ones(10, 95)}),
                 ["mis-shaped", "head.weight expected [10, 96], got [10, 95]"], id="misshaped-tensor"),
    pytest.param(None, lambda ts: ts.update({"head.bias": torch.ones(10, dtype=torch.int32)}),
                 ["wrong dtype", "head.bias expected a floating dtype, got torch.int32"], id="int-for-float"),
])
def test_bad_contents(tmp_path, saved, config, tensors, needles):
    path = _rewrite(saved[0], tmp_path / "bad.safetensors", config=config, tensors=tensors)
    _raises(path, *needles)


def test_many_missing_tensors_are_summarised(tmp_path, saved):
    def drop_blocks(ts):
        for k in [k for k in ts if k.startswith("blocks.")]:
            del ts[k]
    msg = _raises(_rewrite(saved[0], tmp_path / "bad.safetensors", tensors=drop_blocks), "missing tensor(s)", "more)")
    assert len(msg) < 1000


def test_not_a_far_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, path)
    _raises(path, "no 'far_config'")


def test_bad_backend_is_a_value_error(saved):
    with pytest.raises(ValueError, match="unknown backend"):
        far.load(saved[0], backend="nope")


# ---- atomic writes and save-time validation ----
def _boom_serializer(real):
    def boom(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a crash half-way through the write
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("No space left on device")
    return boom


def _boom_replace(*args, **kwargs):
    raise OSError("rename failed")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("target,make,exc", [
    pytest.param((safetensors.torch, "save_file"), _boom_serializer, OSError, id="serializer-disk-full"),
    pytest.param((safetensors.torch, "save_file"), lambda real: _interrupt, KeyboardInterrupt, id="serializer-ctrl-c"),
    pytest.param((far.utils.fs.os, "replace"), lambda real: _boom_replace, OSError, id="replace"),
])
def test_interrupted_save_keeps_old_file(tmp_path, monkeypatch, target, make, exc):
    old = _model("pruned")
    path = tmp_path / "m.safetensors"
    far.save(old, path, metadata=META)
    before = path.read_bytes()
    module, attr = target
    monkeypatch.setattr(module, attr, make(getattr(module, attr)))
    with pytest.raises(exc):
        far.save(_model("dense", seed=1), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert path.read_bytes() == before
    _assert_same_model(old, far.load(path))


@pytest.mark.parametrize("metadata,needle", [
    pytest.param({"optimizer": object()}, "metadata['optimizer'] is a builtins.object", id="object"),
    pytest.param({"t": {"x": torch.ones(1)}}, "metadata['t']['x'] is a torch.Tensor", id="tensor"),
    pytest.param({"loss": float("nan")}, "not a finite number", id="nan"),
    pytest.param({1: "a"}, "non-string key 1", id="int-key"),
    pytest.param([1, 2], "must be a dict", id="not-a-dict"),
])
def test_bad_metadata_raises_before_writing(tmp_path, metadata, needle):
    model = _model("teacher")
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="metadata") as e:
        far.save(model, path, metadata=metadata)
    assert needle in str(e.value)
    assert os.listdir(tmp_path) == []


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="cannot record the architecture of torch.nn.modules.linear.Linear"):
        far.save(model, tmp_path / "m.safetensors")
    m = _model("teacher")
    m.far_arch = {"timm_name": "fmnist_deit_tiny", "kwargs": {"norm_layer": torch.nn.LayerNorm}}
    with pytest.raises(ValueError, match=r"far_arch\['kwargs'\]\['norm_layer'\]"):
        far.save(m, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def _file_size_limit(limit: int):
    """preexec_fn: files of the process may not grow beyond `limit` bytes; a write past it fails with EFBIG
    (SIGXFSZ ignored), as a full disk fails with ENOSPC: a real failure of the OS, not a mocked one."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_save_that_the_disk_refuses_is_one_error_line_and_keeps_old_file(tmp_path):
    """safetensors' writer reports a failed write as SafetensorError (not an OSError): far.save turns it into
    an OSError naming the destination, so `far` prints one line (not a traceback) and the old file stays."""
    import subprocess
    import sys

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    limit = 1 << 18  # the zoo teacher's checkpoint is 1.8 MB, well past it
    p = subprocess.run([sys.executable, "-m", "far.cli", "convert", "fmnist_deit_tiny", "-o", str(path), "-f"],
                       capture_output=True, text=True, preexec_fn=_file_size_limit(limit), timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [f"far: error: {path}: cannot write (File too large)"], p.stderr
    assert os.listdir(tmp_path) == ["m.safetensors"] and path.read_bytes() == b"old"


KILLED_WRITER = """
import sys, torch
import far.checkpoint as c
from far.models import zoo_path
config = {k: v for k, v in c.read_config(zoo_path("fmnist_deit_tiny")).items() if k != c.DIGEST_KEY}
tensors = {f"w{i}": torch.ones(1 << 22) for i in range(48)}  # 768 MiB: seconds to write
print("writing", flush=True)
c.write(sys.argv[1], tensors, config)
"""


def test_a_killed_save_leaves_nothing_the_next_save_does_not_remove(tmp_path):
    """kill -9 in the middle of far.save: the old file stays, and whatever the killed write left in the folder
    (safetensors writes its own temporary file, '.tmpXXXXXX', beside the name it is given) is gone after the next
    save to that path."""
    import subprocess
    import sys
    import time

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "writing\n"

        def written() -> int:  # bytes of the new checkpoint on disk so far, wherever its writer put them
            return sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file() and f != path)

        deadline = time.monotonic() + 120
        while written() < 1 << 20 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.005)
        assert p.poll() is None and written() >= 1 << 20, "the write finished (or never started) before the kill"
    finally:
        p.kill()
        p.wait()
    assert path.read_bytes() == b"old"
    far.save(_model("pruned"), path)
    assert [f.name for f in tmp_path.iterdir()] == ["m.safetensors"]
    far.load(path)

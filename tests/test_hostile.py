"""Hostile inputs: every one is a clean error (CheckpointError / DataError / ConfigError, or one
`far: error:` line and exit code 2 from the CLI), never lost data, a hang, a crash or a resource bomb.
Every hostile file is generated here; the fuzzing of whole checkpoints is in test_checkpoint_fuzz.py."""
import contextlib
import copy
import io
import json
import os
import re
import struct
import threading
import time
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import far
import far_kernels
from far import CheckpointError
from far.cli.main import main
from far.data import load_image, read_idx
from far.errors import ConfigError, DataError
from far.train import TrainConfig
from far.utils import fs


def tiny(far_blocks=True):
    torch.manual_seed(0)
    return far.create_model("fmnist_deit_tiny", far=far_blocks, depth=1, embed_dim=8, num_heads=2,
                            **({"hidden_sizes": 2} if far_blocks else {}))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "m.safetensors"
    far.save(tiny(), path)
    return path


def cli(argv):
    """(exit code, stderr lines) of `far ARGV` run in-process."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue().strip().splitlines()


def assert_user_error(argv, *needles):
    rc, lines = cli(argv)
    errors = [line for line in lines if line.startswith("far: error:")]
    assert rc == 2 and len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def rewrite(src, dst, config=None, tensors=None, meta=None, keep_digest=False):
    """Re-save src after config(cfg) / tensors(dict) / meta(dict) edits (each may return a replacement)."""
    with safe_open(str(src), framework="pt") as f:
        md, ts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(md["far_config"])
    if not keep_digest:
        cfg.pop("sha256", None)
    if config is not None:
        cfg = config(cfg) or cfg
    if tensors is not None:
        ts = tensors(ts) or ts
    md["far_config"] = json.dumps(cfg)
    if meta is not None:
        md = meta(md) or md
    save_file(ts, str(dst), metadata=md)
    return dst


def raw_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def load_error(path, *needles, seconds=20.0):
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        far.load(path)
    assert time.perf_counter() - t < seconds, "a hostile file must be refused quickly, before any big allocation"
    assert str(path) in str(e.value)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return str(e.value)


# ---- no data loss: the one atomic writer ----
@pytest.mark.parametrize("alias", ["same", "hardlink", "symlink"])
@pytest.mark.parametrize("force", [False, True])
def test_eval_json_never_replaces_its_checkpoint(tmp_path, ckpt, alias, force):
    src = tmp_path / "m.safetensors"
    src.write_bytes(ckpt.read_bytes())
    out = {"same": src, "hardlink": tmp_path / "h.json", "symlink": tmp_path / "s.json"}[alias]
    if alias == "hardlink":
        os.link(src, out)
    elif alias == "symlink":
        os.symlink(src, out)
    before = src.read_bytes()
    for cmd in (["eval", src, "--data", "fashion-mnist", "--limit", "2", "-q", "--json", out],
                ["imc-eval", src, "--data", "fashion-mnist", "--limit", "2", "-q", "--json", out],
                ["imc-eval", src, "--data", "fashion-mnist", "--limit", "2", "-q", "--plot", out]):
        assert_user_error(cmd + (["-f"] if force else []), "is an input of this command")
    assert src.read_bytes() == before


def test_writer_refuses_what_the_command_read(tmp_path, ckpt):
    """Inside a command, a file read by far.load cannot be replaced by any writer under any name."""
    src = tmp_path / "m.safetensors"
    src.write_bytes(ckpt.read_bytes())
    os.link(src, tmp_path / "other.json")
    with fs.command_inputs():
        far.load(src)
        for target in (src, tmp_path / "other.json"):
            with pytest.raises(ConfigError, match="is an input of this command"):
                fs.write_json(target, {"a": 1})
            with pytest.raises(ConfigError, match="is an input of this command"):
                far.save(tiny(), target)
    assert src.read_bytes() == ckpt.read_bytes()
    fs.write_json(tmp_path / "other.json", {"a": 1})  # outside a command, library callers may overwrite


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_writer_refuses_non_regular_destinations(tmp_path, kind):
    target = tmp_path / "t"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    with pytest.raises(ConfigError, match="folder" if kind == "folder" else "FIFO"):
        fs.atomic_write(target, b"x", force=True)
    assert sorted(os.listdir(tmp_path)) == ["t"]


def test_metrics_log_refuses_a_fifo(tmp_path):
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    box = _no_hang(lambda p: fs.append_jsonl(p, {"step": 1}), fifo)
    assert isinstance(box.get("error"), ConfigError) and "FIFO" in str(box["error"])


def test_writer_refuses_existing_without_force_and_cleans_up(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(ConfigError, match="exists; pass --force"):
        fs.write_json(target, {"a": 1}, force=False)

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        fs.atomic_write(target, boom)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_writer_temp_names_are_unique_and_stale_ones_are_removed(tmp_path):
    target = tmp_path / "r.json"
    dead = tmp_path / ".r.json.999999999.0123456789ab.tmp"  # a killed writer's leftover (no such pid)
    alive = tmp_path / f".r.json.{os.getppid()}.0123456789ab.tmp"  # a running writer's: left alone
    other = tmp_path / ".x.json.999999999.0123456789ab.tmp"  # another destination's: left alone
    for p in (dead, alive, other):
        p.write_text("partial")
    names = []
    fs.atomic_write(target, lambda tmp: names.append(os.path.basename(tmp)) or open(tmp, "w").close())
    fs.atomic_write(target, lambda tmp: names.append(os.path.basename(tmp)) or open(tmp, "w").close())
    assert len(set(names)) == 2 and all(str(os.getpid()) in n for n in names)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name, "r.json"])


# ---- regular files only: no hang on a FIFO, no read of a device ----
def _no_hang(fn, path):
    """Run fn(path) in a thread; a FIFO that blocks it is unblocked (and the test fails)."""
    box = {}

    def run():
        try:
            box["value"] = fn(path)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail(f"{fn} blocked on the FIFO {path}")
    return box


def test_info_and_load_on_a_fifo_do_not_hang(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    box = _no_hang(lambda p: cli(["info", p]), fifo)
    rc, lines = box["value"]
    assert rc == 2 and lines[-1].startswith("far: error:") and "FIFO" in lines[-1], lines
    box = _no_hang(far.load, fifo)
    assert isinstance(box.get("error"), CheckpointError) and "FIFO" in str(box["error"])


def test_device_is_not_a_checkpoint():
    with pytest.raises(CheckpointError, match="character device"):
        far.load("/dev/zero")


def test_fifo_in_an_image_folder_and_as_idx_file(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    box = _no_hang(lambda p: load_image(p, "L"), fifo)
    assert isinstance(box.get("error"), DataError) and str(fifo) in str(box["error"])
    idx = tmp_path / "t10k-images-idx3-ubyte.gz"
    os.mkfifo(idx)
    box = _no_hang(read_idx, idx)
    assert isinstance(box.get("error"), DataError) and "FIFO" in str(box["error"])


# ---- checkpoint headers and configs ----
def _nested(depth):
    return "[" * depth + "]" * depth


HEADERS = [
    pytest.param(lambda: _nested(100_000).encode(), "nested too deeply", id="deeply-nested-header"),
    pytest.param(lambda: ('{"__metadata__": {"far_config": "{}"}, "a": ' + _nested(200) + "}").encode(),
                 "nested more than", id="nested-header-entry"),
    pytest.param(lambda: json.dumps({"__metadata__": {"far_config": 5}}).encode(), "strings to strings",
                 id="metadata-int"),
    pytest.param(lambda: json.dumps({"__metadata__": {"far_config": {"a": 1}}}).encode(), "strings to strings",
                 id="metadata-dict"),
    pytest.param(lambda: json.dumps({"__metadata__": [1]}).encode(), "strings to strings", id="metadata-list"),
    pytest.param(lambda: json.dumps({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode(),
                 "unknown dtype", id="unknown-dtype"),
    pytest.param(lambda: json.dumps({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(),
                 "invalid shape", id="negative-shape"),
    pytest.param(lambda: json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(),
                 "does not fit", id="shape-vs-offsets"),
    pytest.param(lambda: json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}).encode(),
                 "data_offsets", id="reversed-offsets"),
    pytest.param(lambda: json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e30]}}).encode(),
                 "data_offsets", id="float-offsets"),
    pytest.param(lambda: b"\xff\xfe{}", "UTF-8", id="not-utf8"),
]


@pytest.mark.parametrize("make,needle", HEADERS)
def test_hostile_headers(tmp_path, make, needle):
    path = raw_file(tmp_path / "h.safetensors", make(), b"\0" * 8)
    load_error(path, needle)
    assert_user_error(["info", path], needle)


def _kwargs(**kw):
    return lambda c: c["architecture"]["kwargs"].update(kw)


def _pcfg(**kw):
    return lambda c: c["pretrained_cfg"].update(kw)


CONFIGS = [
    pytest.param(lambda c: {**c, "deep": json.loads(_nested(500))}, "nested more than", id="deep-config"),
    pytest.param(lambda c: c.update(far_version=5), "far_version must be a string", id="far-version-int"),
    pytest.param(lambda c: c.update(sha256="x" * 10), "64 lowercase hex", id="digest-format"),
    pytest.param(_kwargs(depth=3000), "depth must be an int in [0, 64]", id="depth-3000"),
    pytest.param(_kwargs(depth=-1), "depth must be", id="depth-negative"),
    pytest.param(_kwargs(embed_dim=120000), "embed_dim must be", id="embed-dim-huge"),
    pytest.param(_kwargs(embed_dim="x"), "embed_dim must be", id="embed-dim-str"),
    pytest.param(_kwargs(num_classes=10**9), "num_classes must be", id="num-classes-huge"),
    pytest.param(_kwargs(img_size=10**6), "img_size must be", id="img-size-huge"),
    pytest.param(_kwargs(img_size=[28, 10**6]), "img_size must be", id="img-size-list-huge"),
    pytest.param(_kwargs(mlp_ratio=1e9), "mlp_ratio must be", id="mlp-ratio-huge"),
    pytest.param(_kwargs(num_heads=0), "num_heads must be", id="num-heads-0"),
    pytest.param(_kwargs(checkpoint_path="/etc/passwd"), "not allowed", id="checkpoint-path"),
    pytest.param(_kwargs(pretrained=True), "not allowed", id="pretrained"),
    pytest.param(_kwargs(norm_layer={"a": 1}), "short flat list", id="kwarg-dict"),
    pytest.param(_kwargs(embed_dim=4096, num_heads=64), "does not match|do not match|values", id="big-but-in-range"),
    pytest.param(lambda c: c["architecture"].update(timm_name="vit_huge_patch14_224", kwargs={}), "stores",
                 id="huge-timm-default"),
    pytest.param(lambda c: c["far"]["blocks"][0].update(hidden_sizes=[[10**9] * 2, [1] * 2]),
                 "hidden sizes must be <=", id="hidden-1e9"),
    pytest.param(lambda c: c["far"]["blocks"][0].update(hidden_sizes=[[8000] * 2, [8000] * 2]),
                 "stores", id="hidden-8000"),
    pytest.param(lambda c: c["far"]["blocks"][0].update(num_heads=10**6), "num_heads must lie", id="num-heads-1e6"),
    pytest.param(lambda c: c["far"]["blocks"].append(dict(c["far"]["blocks"][0])), "appears twice",
                 id="duplicate-block"),
    pytest.param(_pcfg(input_size="abc"), "input_size must be", id="pcfg-input-size-str"),
    pytest.param(_pcfg(input_size=[1, 28]), "input_size must be", id="pcfg-input-size-2"),
    pytest.param(_pcfg(input_size=[1, -28, 28]), "input_size must be", id="pcfg-input-size-negative"),
    pytest.param(_pcfg(input_size=[1, 10**9, 10**9]), "input_size must be", id="pcfg-input-size-huge"),
    pytest.param(_pcfg(mean="x"), "mean must be", id="pcfg-mean-str"),
    pytest.param(_pcfg(mean=[1, 2]), "2 values for 1 input channel", id="pcfg-mean-channels"),
    pytest.param(_pcfg(std=[0]), "std must be > 0", id="pcfg-std-zero"),
    pytest.param(_pcfg(std=[-1.0]), "std must be > 0", id="pcfg-std-negative"),
    pytest.param(_pcfg(num_classes="10"), "num_classes must be", id="pcfg-num-classes-str"),
    pytest.param(_pcfg(crop_pct="a"), "crop_pct must be", id="pcfg-crop-str"),
    pytest.param(_pcfg(interpolation=5), "interpolation must be", id="pcfg-interpolation-int"),
]


@pytest.mark.parametrize("edit,needle", CONFIGS)
def test_hostile_configs(tmp_path, ckpt, edit, needle):
    path = rewrite(ckpt, tmp_path / "c.safetensors", config=edit)
    msg = load_error(path)
    assert re.search(needle.replace("[", r"\[").replace("]", r"\]"), msg), msg
    rc, lines = cli(["eval", path, "--data", "fashion-mnist", "--limit", "2", "-q"])
    assert rc == 2 and lines[-1].startswith("far: error:") and sum(line.startswith("far:") for line in lines) == 1


@pytest.mark.parametrize("edit,needle", [
    pytest.param(lambda ts: {k: (v.half() if k.startswith("blocks.0.attn") else v) for k, v in ts.items()},
                 "mixed floating dtypes", id="mixed-dtypes"),
    pytest.param(lambda ts: {k: (v.to(torch.float8_e4m3fn) if k == "head.weight" else v) for k, v in ts.items()},
                 "F8_E4M3", id="float8"),
    pytest.param(lambda ts: {**ts, "head.bias": ts["head.bias"].int()}, "wrong dtype", id="int-for-float"),
])
def test_hostile_tensors(tmp_path, ckpt, edit, needle):
    load_error(rewrite(ckpt, tmp_path / "t.safetensors", tensors=edit), needle)


def test_every_float_dtype_of_a_whole_model_loads(tmp_path, ckpt):
    for dtype in (torch.float64, torch.bfloat16):
        path = rewrite(ckpt, tmp_path / "d.safetensors",
                       tensors=lambda ts: {k: v.to(dtype) if v.is_floating_point() else v for k, v in ts.items()})
        assert next(far.load(path).parameters()).dtype == dtype


def test_metadata_of_any_json_shape_is_shown(tmp_path, ckpt):
    path = rewrite(ckpt, tmp_path / "m.safetensors",
                   config=lambda c: c.update(metadata={"teacher": [1, 2], "fidelity": {"blocks": "x", "agreement": "y"}}))
    rc, lines = cli(["info", path])
    assert rc == 0, lines


# ---- images ----
def _png(path, width, height, mode=0, body=b""):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IEND", b""))
    return path


def _image_folder(root):
    from PIL import Image
    for c in "abcdefghij":
        (root / c).mkdir(parents=True)
        Image.new("L", (28, 28), ord(c)).save(root / c / "0.png")
    return root


@pytest.mark.parametrize("make,needle", [
    pytest.param(lambda p: _png(p, 100_000, 100_000), "too large", id="decompression-bomb"),
    pytest.param(lambda p: p.write_bytes(open(_png(p, 28, 28), "rb").read()[:30]), "cannot read image",
                 id="truncated"),
    pytest.param(lambda p: p.write_text("not an image"), "cannot read image", id="text"),
    pytest.param(lambda p: p.write_bytes(b""), "cannot read image", id="empty"),
])
def test_bad_images_name_the_file(tmp_path, make, needle):
    root = _image_folder(tmp_path / "imgs")
    bad = root / "a" / "bad.png"
    make(bad)
    with pytest.raises(DataError) as e:
        load_image(bad, "L")
    assert str(bad) in str(e.value) and needle in str(e.value)
    assert_user_error(["eval", "fmnist_far_tiny", "--data", root, "-q", "--workers", "0"], str(bad), needle)


def test_bad_image_in_a_worker_is_one_line(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "a" / "bad.png").write_text("not an image")
    line = assert_user_error(["eval", "fmnist_far_tiny", "--data", root, "-q", "--workers", "1"],
                             str(root / "a" / "bad.png"))
    assert "Original Traceback" not in line


def test_gzip_bomb_idx_is_bounded(tmp_path, monkeypatch):
    import gzip

    import far.data
    monkeypatch.setattr(far.data, "MAX_IDX_BYTES", 1 << 16)
    path = tmp_path / "x-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\0\0\x08\x01" + struct.pack(">I", 1 << 20) + b"\0" * (1 << 20))
    with pytest.raises(DataError, match="more than"):
        read_idx(path)


# ---- command-line numbers ----
TEACHER = ["train-teacher", "--data", "fashion-mnist", "--limit", "32", "-q"]
CONVERT = ["convert", "fmnist_deit_tiny", "-q", "-f"]


@pytest.mark.parametrize("argv,needle", [
    pytest.param(TEACHER + ["--epochs", "inf"], "--epochs must be a finite number", id="epochs-inf"),
    pytest.param(TEACHER + ["--epochs", "nan"], "--epochs must be a finite number", id="epochs-nan"),
    pytest.param(TEACHER + ["--lr", "inf"], "--lr must be a finite number", id="lr-inf"),
    pytest.param(TEACHER + ["--num-classes", "1000000000"], "--num-classes must lie in", id="teacher-classes"),
    pytest.param(CONVERT + ["--num-classes", "1000000000"], "--num-classes must lie in", id="convert-classes"),
    pytest.param(CONVERT + ["--hidden-size", "1000000000"], "--hidden-size must lie in", id="convert-hidden"),
    pytest.param(CONVERT + ["--hidden-size", "32,1000000000"], "--hidden-size must lie in", id="convert-hidden-per-block"),
    pytest.param(["distill", "fmnist_deit_tiny", "--data", "fashion-mnist", "--limit", "32", "-q", "--hidden-size",
                  "1000000000"], "--hidden-size must lie in", id="distill-hidden"),
])
def test_unusable_numbers_are_one_line(tmp_path, argv, needle):
    out = ["--out-dir", tmp_path / "run"] if argv[0] == "train-teacher" else ["-o", tmp_path / "x.safetensors"]
    t = time.perf_counter()
    assert_user_error(argv + out, needle)
    assert time.perf_counter() - t < 10 and not (tmp_path / "run").exists()


# ---- --resume ----
def _train(out_dir, resume=False, max_steps=None):
    from far.data import fashion_mnist

    cfg = TrainConfig(epochs=1, batch_size=16, limit=32, eval_limit=16, progress=False, ckpt_every=1, ema=0.9,
                      out_dir=str(out_dir), resume=resume, max_steps=max_steps)
    model = far.train_classifier(tiny(far_blocks=False), fashion_mnist("train", limit=32),
                                 eval_data=fashion_mnist("test", limit=16), config=cfg)
    return model.far_run


@pytest.fixture(scope="module")
def last_pt(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    _train(run, max_steps=1)
    return torch.load(run / "last.pt", weights_only=True)


def _edit(fn):
    def apply(state):
        state = copy.deepcopy(state)
        fn(state)
        return state
    return apply


def _first_opt_state(s):
    s["optimizer"]["state"][next(iter(s["optimizer"]["state"]))]["exp_avg"] = torch.zeros(1)


RESUMES = [
    pytest.param(lambda s: [1, 2], "not a far training checkpoint", id="list"),
    pytest.param(_edit(lambda s: s.pop("optimizer")), "'optimizer' is missing", id="missing-key"),
    pytest.param(_edit(lambda s: s.update(step=-100)), "step -100 is outside", id="step-negative"),
    pytest.param(_edit(lambda s: s.update(step=10**12)), "step 1000000000000 is outside", id="step-huge"),
    pytest.param(_edit(lambda s: s.update(step="3")), "'step' is missing or not of type int", id="step-str"),
    pytest.param(_edit(lambda s: s.update(step=True)), "'step'", id="step-bool"),
    pytest.param(_edit(lambda s: s["model"].update({"head.weight": torch.zeros(3, 3)})), "model.head.weight",
                 id="model-shape"),
    pytest.param(_edit(lambda s: s["model"].update({"head.weight": s["model"]["head.weight"].half()})),
                 "torch.float16", id="model-dtype"),
    pytest.param(_edit(lambda s: s["model"].pop("head.bias")), "missing head.bias", id="model-missing"),
    pytest.param(_edit(lambda s: s["ema"].update({"head.bias": torch.zeros(7)})), "ema.head.bias", id="ema-shape"),
    pytest.param(_edit(_first_opt_state), "optimizer state 'exp_avg'", id="optimizer-shape"),
    pytest.param(_edit(lambda s: s["optimizer"].update(param_groups=[])), "parameter groups", id="optimizer-groups"),
    pytest.param(_edit(lambda s: s["identity"].update(json="{")), "not valid JSON", id="identity-json"),
    pytest.param(_edit(lambda s: s.update(history="[1")), "not valid JSON", id="history-json"),
    pytest.param(_edit(lambda s: s.update(history="[1]")), "list of objects", id="history-type"),
    pytest.param(b"garbage", "cannot read it", id="garbage-bytes"),
]


@pytest.mark.parametrize("make,needle", RESUMES)
def test_hostile_resume_state(tmp_path, last_pt, make, needle):
    path = tmp_path / "last.pt"
    if isinstance(make, bytes):
        path.write_bytes(make)
    else:
        torch.save(make(last_pt), path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as e:
        _train(tmp_path, resume=True)
    assert needle in str(e.value) and str(path) in str(e.value), str(e.value)
    assert path.read_bytes() == before  # nothing was trained or written


def test_valid_resume_state_still_resumes(tmp_path, last_pt):
    torch.save(last_pt, tmp_path / "last.pt")
    run = _train(tmp_path, resume=True)
    assert run.completed and run.steps == 2


# ---- kernels: out= aliasing and hidden sizes read without the GIL ----
def _scan_args(H=2, B=2, T=5, n=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(H, B, T, 2, 4 * n, generator=g), torch.randn(H, 2, 4 * n, n, generator=g) * 0.1, n


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("alias", ["gx-head", "gx-tail", "w_hh-partial", "hidden_sizes"])
def test_scan_out_overlapping_an_input_is_refused(backend, alias):
    from far_kernels.ops.bilstm_scan import OP
    if OP.reason(backend, "cpu") is not None:
        pytest.skip(OP.reason(backend, "cpu"))
    gx, w_hh, n = _scan_args()
    H, B, T = gx.shape[:3]
    shape = (H, B, T, 2, n)
    numel = H * B * T * 2 * n
    hs = torch.full((2, H), n, dtype=torch.int64)
    if alias == "gx-head":
        out = gx.view(-1)[:numel].view(shape)
    elif alias == "gx-tail":
        out = gx.view(-1)[gx.numel() - numel:].view(shape)
    elif alias == "w_hh-partial":
        buf = torch.zeros(w_hh.numel() + numel)
        w_hh = buf[:w_hh.numel()].view_as(w_hh).copy_(w_hh)
        out = buf[w_hh.numel() - 1:w_hh.numel() - 1 + numel].view(shape)  # one element shared
    else:
        buf = torch.zeros(numel)
        hs = buf[:4 * H].view(torch.int64).view(2, H).fill_(n)
        out = buf.view(shape)
    with pytest.raises(ValueError, match="shares memory"):
        far_kernels.bilstm_scan(gx, w_hh, hs, backend=backend, out=out)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("alias", ["x", "w_ih", "bias", "w_hh"])
def test_fused_scan_out_overlapping_an_input_is_refused(backend, alias):
    """The fused op (what a FAR block calls) refuses an aliased out= on every backend too."""
    from far_kernels.ops.bilstm_fused_scan import OP
    if OP.reason(backend, "cpu") is not None:
        pytest.skip(OP.reason(backend, "cpu"))
    g = torch.Generator().manual_seed(0)
    H, B, T, d, n = 2, 2, 5, 8, 4
    args = {"x": torch.randn(B, T, H * d, generator=g), "w_ih": torch.randn(H, 2, 4 * n, d, generator=g) * 0.1,
            "bias": torch.zeros(H, 2, 4 * n), "w_hh": torch.randn(H, 2, 4 * n, n, generator=g) * 0.1}
    numel = H * B * T * 2 * n
    buf = torch.zeros(args[alias].numel() + numel)
    args[alias] = buf[:args[alias].numel()].view_as(args[alias]).copy_(args[alias])
    out = buf[args[alias].numel() - 1:args[alias].numel() - 1 + numel].view(H, B, T, 2, n)  # one element shared
    with pytest.raises(ValueError, match="shares memory"):
        far_kernels.bilstm_fused_scan(args["x"], args["w_ih"], args["bias"], args["w_hh"], [[n, n], [n, 3]],
                                      backend=backend, out=out)


def test_cpp_binding_refuses_overlap_itself():
    """The check is repeated in C++ for callers of the backend function."""
    from far_kernels.ops.bilstm_scan import OP
    from far_kernels.ops.bilstm_scan.cpp import bilstm_scan_cpp
    if OP.reason("cpp", "cpu") is not None:
        pytest.skip(OP.reason("cpp", "cpu"))
    gx, w_hh, n = _scan_args()
    out = gx.view(-1)[:gx.numel() // 4].view(*gx.shape[:4], n)
    with pytest.raises(RuntimeError, match="shares memory"):
        bilstm_scan_cpp(gx, w_hh, torch.full((2, gx.shape[0]), n, dtype=torch.int64), out)


def test_cpp_scan_survives_hidden_sizes_changed_by_another_thread():
    """The C++ kernel runs without the GIL: it must read its own copy of hidden_sizes, validated once."""
    from far_kernels.ops.bilstm_scan import OP
    from far_kernels.ops.bilstm_scan.cpp import bilstm_scan_cpp
    if OP.reason("cpp", "cpu") is not None:
        pytest.skip(OP.reason("cpp", "cpu"))
    gx, w_hh, n = _scan_args(H=4, B=8, T=64, n=16)
    hs = torch.full((2, 4), n, dtype=torch.int64)
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            hs.fill_(10**9)  # would index far out of bounds if read after validation
            hs.fill_(n)
    t = threading.Thread(target=flip, daemon=True)
    t.start()
    try:
        for _ in range(200):
            try:
                h = bilstm_scan_cpp(gx, w_hh, hs)
                assert torch.isfinite(h).all()
            except RuntimeError as e:  # validated a moment with the bad value: a clean refusal
                assert "outside [0, 16]" in str(e)
    finally:
        stop.set()
        t.join()


def test_one_wide_head_among_empty_ones_is_not_a_padding_bomb(tmp_path):
    """Load pads each FAR block to its widest (head, direction): a file whose kept units are one head's K
    (the 63 other heads and all backward units pruned to 0) would allocate 2H = 128x what it stores."""
    H, K = 64, 256
    model = far.create_model("fmnist_deit_tiny", depth=1, embed_dim=H, num_heads=H, hidden_sizes=0)
    src = tmp_path / "empty.safetensors"
    far.save(model, src)
    wide = {"lstm.w_ih": (4 * K, 1), "lstm.w_hh": (4 * K * K,), "lstm.b_ih": (4 * K,), "lstm.b_hh": (4 * K,),
            "head_proj.weight": (1, K)}
    sizes = [[K] + [0] * (H - 1), [0] * H]
    path = rewrite(src, tmp_path / "wide.safetensors",
                   config=lambda c: c["far"]["blocks"][0].update(hidden_sizes=sizes),
                   tensors=lambda ts: {**ts, **{"blocks.0.attn." + k: torch.zeros(s) for k, s in wide.items()}})
    stored = sum(t.numel() for t in far.checkpoint.read(path)[1].values())
    padded = H * 2 * 4 * K * (1 + K)  # w_ih and w_hh at width K for every (head, direction)
    assert padded > 50 * stored  # the file is consistent: only its padding is large
    load_error(path, "describes a model of at least")

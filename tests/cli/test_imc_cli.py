"""`far imc-eval`: table, JSON and plot for a sweep on tiny random models; one-line user errors."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

import far
from far.cli import main

needs_fmnist = pytest.mark.fmnist

# few slices per product (fast on a CPU), still an ADC that clips
FAST = ["--set", "cell_bits=4", "--set", "dac_bits=4"]
FASTEST = ["--set", "cell_bits=7", "--set", "dac_bits=7"]  # 8-bit weights and inputs: one slice each


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("far: error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A 1-block attention ViT for Fashion-MNIST (random init), saved with far.save."""
    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", far=False, depth=1, embed_dim=16, num_heads=2)
    path = tmp_path_factory.mktemp("imc") / "teacher.safetensors"
    far.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def far_ckpt(tmp_path_factory):
    """The same shape converted to FAR with 2 LSTM units per head and direction."""
    torch.manual_seed(1)
    model = far.create_model("fmnist_deit_tiny", depth=1, embed_dim=8, num_heads=2, hidden_sizes=2)
    path = tmp_path_factory.mktemp("imc") / "far.safetensors"
    far.save(model, str(path))
    return path


def test_wilson95_by_hand():
    from far.cli.imc import wilson95

    z = 1.959964
    # 0 of 100 right: [0, z^2 / (n + z^2)], not the normal approximation's empty [0, 0]
    lo, hi = wilson95(0.0, 100)
    assert lo == 0.0 and abs(hi - z * z / (100 + z * z)) < 1e-12
    lo, hi = wilson95(1.0, 100)
    assert hi == 1.0 and abs(1 - lo - z * z / (100 + z * z)) < 1e-12
    # p = 1/2: symmetric about 1/2, half-width z*sqrt(n/4 + z^2/4) / (n + z^2)
    lo, hi = wilson95(0.5, 400)
    assert abs((lo + hi) / 2 - 0.5) < 1e-12 and abs((hi - lo) / 2 - z * (100 + z * z / 4) ** 0.5 / (400 + z * z)) < 1e-12
    # large n: close to the normal approximation
    lo, hi = wilson95(0.9, 10**6)
    assert abs((hi - lo) / 2 - z * (0.09 / 10**6) ** 0.5) < 1e-7
    assert wilson95(0.3, 0) == (0.3, 0.3)


def test_help(capsys):
    code, out, _ = run(capsys, "imc-eval", "--help")
    assert code == 0
    for opt in ("--sweep", "--set", "--include", "--exclude", "--calib-images", "--plot", "--json", "--limit",
                "adc_bits", "calibrated", "examples", "q@k^T"):
        assert opt in out, opt
    code, out, _ = run(capsys, "--help")
    assert "imc-eval" in out


@needs_fmnist
def test_sweep_table_json_plot(capsys, teacher_ckpt, tmp_path):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--limit", 12,
                         "--batch-size", 6, "--sweep", "adc_bits=3,8", *FAST, "--json", js, "--plot", png)
    assert code == 0, err
    lines = out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:2] == ["setting", "accuracy"])
    rows = [l.split() for l in lines[head + 1:]]
    assert [r[0] for r in rows] == ["digital", "adc_bits=3", "adc_bits=8"]
    res = json.loads(js.read_text())
    assert res["num_images"] == 12 and res["sweeps"] == [{"key": "adc_bits", "values": [3, 8]}]
    assert res["complete"] is True and res["emulated"] and all(isinstance(n, str) for n in res["emulated"])
    assert res["checkpoint_sha256"] == hashlib.sha256(Path(teacher_ckpt).read_bytes()).hexdigest()
    from far.utils.env import device_name

    assert res["device"] == "cpu" and res["device_name"] == device_name("cpu")  # e.g. "cpu (Intel Xeon, 2 cores)"
    assert [r["setting"] for r in res["results"]] == ["digital", "adc_bits=3", "adc_bits=8"]
    for r, printed in zip(res["results"], rows):
        assert 0 <= r["accuracy"] <= 1 and r["num_images"] == 12
        assert printed[1] == f"{100 * r['accuracy']:.2f}%"
    assert res["results"][1]["config"]["adc_bits"] == 3 and res["results"][2]["config"]["cell_bits"] == 4
    assert res["base_config"]["dac_bits"] == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


@needs_fmnist
def test_attention_pool_left_digital_is_said(capsys, tmp_path):
    """A global_pool="map" model: its pool's q@k^T and attn@v are not emulated; imc-eval says so in the table and
    the JSON, imc-cost --emulate warns, and its costs count the pool's products (a "pool" row)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    path, js = tmp_path / "map.safetensors", tmp_path / "map.json"
    far.save(VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16, depth=1,
                               num_heads=2, global_pool="map").eval(), str(path))
    code, out, err = run(capsys, "imc-eval", path, "--data", "fashion-mnist", "--limit", 2, "--batch-size", 2,
                         *FASTEST, "--json", js, "-q")
    assert code == 0, err
    assert "not emulated (digital, full precision): q@k^T and attn@v of the attention pool(s) attn_pool" in out
    res = json.loads(js.read_text())
    assert res["not_emulated"] == ["attn_pool"] and "attn_pool.kv" in res["emulated"]
    code, out, err = run(capsys, "imc-cost", path, "--data", "fashion-mnist", "--limit", 2, "--batch-size", 2,
                         "--emulate", *FASTEST, "--json", js, "-f", "-q")
    assert code == 0, err
    assert "far: warning:" in err and "attention pool(s) attn_pool digital in full precision" in err
    rows = json.loads(js.read_text())["models"][0]["cost"]["write"]["rows"]
    assert [(r["name"], r["macs"]) for r in rows if r["kind"] == "pool"] == [("attn_pool", 2 * 2 * 1 * 16 * 8)]


@needs_fmnist
def test_json_says_which_code_and_when(capsys, teacher_ckpt, tmp_path):
    """--json carries the environment record the benchmarks write: git commit and dirty flag, date, host."""
    from far.utils.env import git_state

    js = tmp_path / "r.json"
    code, _, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--limit", 2, "--batch-size", 2,
                       *FASTEST, "--json", js, "-q")
    assert code == 0, err
    env = json.loads(js.read_text())["environment"]
    assert env["git_commit"] == git_state()["git_commit"] and env["git_source"] == git_state()["git_source"]
    assert env["date_utc"] and env["versions"]["far"] and "git_dirty" in env


@needs_fmnist
def test_far_model_calibrated_and_include(capsys, far_ckpt, tmp_path):
    """A FAR checkpoint: its recurrent products through crossbars, calibrated ADC ranges."""
    js = tmp_path / "far.json"
    code, out, err = run(capsys, "imc-eval", far_ckpt, "--data", "fashion-mnist", "--limit", 2, "--batch-size", 2,
                         "--sweep", "adc_range=max,calibrated", "--set", "adc_bits=6", *FASTEST,
                         "--include", "*.w_hh.*", "--calib-images", 2, "--json", js, "-q")
    assert code == 0, err
    res = json.loads(js.read_text())
    assert [r["setting"] for r in res["results"]] == ["digital", "adc_range=max", "adc_range=calibrated"]
    assert res["results"][2]["calibration_images"] == 2 and res["include"] == ["*.w_hh.*"]
    assert "emulated: 4 crossbar products, include ['*.w_hh.*']: blocks.0.attn.w_hh.*.* x4" in out  # 2 heads x 2 dirs
    assert res["lstm_mapping"] == "separate"
    # the fused mapping: one [W_ih | W_hh] product per (head, direction), calibrated too; its names, not w_hh's
    code, out, err = run(capsys, "imc-eval", far_ckpt, "--data", "fashion-mnist", "--limit", 2, "--batch-size", 2,
                         "--set", "adc_range=calibrated", "--set", "adc_bits=6", *FASTEST, "--lstm-mapping", "fused",
                         "--include", "*.lstm.*", "--calib-images", 2, "--json", js, "--force", "-q")
    assert code == 0, err
    assert json.loads(js.read_text())["lstm_mapping"] == "fused"
    assert "emulated: 4 crossbar products, include ['*.lstm.*']: blocks.0.attn.lstm.*.* x4" in out
    code, out, err = run(capsys, "imc-eval", far_ckpt, "--data", "fashion-mnist", "--limit", 2, "--lstm-mapping",
                         "fused", "--include", "*.w_hh.*", "-q")
    assert code != 0 and "matches no emulatable layer" in err and "products are X.lstm.<head>.<dir>" in err


@needs_fmnist
def test_grid_seeds_and_incremental_json(capsys, far_ckpt, tmp_path, monkeypatch):
    """Two --sweep options form a grid; noisy settings run --seeds times (mean, std, per-seed figures); the
    JSON is rewritten after every setting, so a run stopped midway keeps what it measured."""
    js, png = tmp_path / "grid.json", tmp_path / "grid.png"
    import far.cli.imc as imc_cli

    seen = []
    from far.utils import fs

    real_write = fs.write_json
    assert "write_json" not in vars(imc_cli)  # imported inside the command, so the spy is what it finds

    def spy(path, obj, **kw):
        seen.append((len(obj["results"]), obj["complete"]))
        return real_write(path, obj, **kw)

    monkeypatch.setattr(fs, "write_json", spy)
    code, out, err = run(capsys, "imc-eval", far_ckpt, "--data", "fashion-mnist", "--limit", 4, "--batch-size", 4,
                         *FASTEST, "--sweep", "adc_bits=6,8", "--sweep", "read_noise=0,0.05", "--seeds", 2,
                         "--json", js, "--plot", png)
    assert code == 0, err
    res = json.loads(js.read_text())
    labels = [r["setting"] for r in res["results"]]
    assert labels == ["digital", "adc_bits=6 read_noise=0", "adc_bits=6 read_noise=0.05",
                      "adc_bits=8 read_noise=0", "adc_bits=8 read_noise=0.05"]
    assert [s["key"] for s in res["sweeps"]] == ["adc_bits", "read_noise"]
    for r in res["results"][1:]:
        noisy = r["values"]["read_noise"] > 0
        assert r["seeds"] == ([0, 1] if noisy else [0]) and len(r["accuracies"]) == len(r["seeds"])
        assert abs(r["accuracy"] - sum(r["accuracies"]) / len(r["accuracies"])) < 1e-12
        p = r["accuracy"]
        # Wilson score interval over the 4 images, by hand
        z2n = 1.959964 ** 2 / 4
        c, h = (p + z2n / 2) / (1 + z2n), 1.959964 / (1 + z2n) * (p * (1 - p) / 4 + z2n / 16) ** 0.5
        assert abs(r["ci95_low"] - max(0.0, c - h)) < 1e-9 and abs(r["ci95_high"] - min(1.0, c + h)) < 1e-9
        assert abs(r["ci95_images"] - (r["ci95_high"] - r["ci95_low"]) / 2) < 1e-12 and r["ci95_images"] > 0
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, False), (5, True)]
    assert "mean over 2 seeds" in out and "95% CI" in out and "left" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_fmnist
def test_dynamic_crossbar_attention(capsys, teacher_ckpt, tmp_path):
    js = tmp_path / "dyn.json"
    code, out, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--limit", 4, "--batch-size",
                         4, *FASTEST, "--dynamic", "digital,crossbar", "--set", "prog_noise=0.02", "--json", js, "-q")
    assert code == 0, err
    res = json.loads(js.read_text())
    assert [(r["setting"], r["dynamic"]) for r in res["results"]] == [
        ("digital", None), ("crossbar attn:digital", "digital"), ("crossbar attn:crossbar", "crossbar")]
    code, _, err = run(capsys, "imc-eval", far_ckpt_path(tmp_path), "--data", "fashion-mnist", "--limit", 2,
                       *FASTEST, "--dynamic", "crossbar", "-q")
    assert code == 0 and "no attention" in err


@needs_fmnist
def test_emulated_attention_products_are_listed(capsys, teacher_ckpt, tmp_path):
    """The list of emulated layers named the crossbar products only: which attentions' q@k^T and attn@v were
    emulated (and which an --exclude left in full precision) was said nowhere, in the table or the JSON."""
    js = tmp_path / "attn.json"
    code, out, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--limit", 2, *FASTEST,
                         "--dynamic", "crossbar", "--json", js, "-q")
    assert code == 0, err
    assert "emulated attention q@k^T and attn@v (crossbar): blocks.0.attn\n" in out, out
    assert json.loads(js.read_text())["emulated_attention"] == ["blocks.0.attn"]
    code, out, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--limit", 2, *FASTEST,
                         "--exclude", "blocks.0.attn", "--json", js, "-f", "-q")
    assert code == 0, err
    assert "emulated attention q@k^T and attn@v (digital): none; full precision: blocks.0.attn" in out, out
    assert json.loads(js.read_text())["emulated_attention"] == []


def far_ckpt_path(tmp_path):
    torch.manual_seed(2)
    path = tmp_path / "far2.safetensors"
    far.save(far.create_model("fmnist_deit_tiny", depth=1, embed_dim=8, num_heads=2, hidden_sizes=2), str(path))
    return path


def test_rate_and_layer_summary_formatting():
    from far.cli.imc import _layer_summary, _rate

    assert _rate(12.345) == "12.3" and _rate(0.05) == "0.1" and _rate(0.0123) == "0.012" and _rate(0.0) == "0"
    assert _layer_summary(["blocks.0.attn.qkv", "blocks.1.attn.qkv", "head"]) == "blocks.*.attn.qkv x2, head"
    # a number every folded name shares stays: '--include blocks.2.*' used to be listed as blocks.*.attn.qkv, ...
    assert _layer_summary(["blocks.2.attn.qkv", "blocks.2.attn.proj"]) == "blocks.2.attn.qkv, blocks.2.attn.proj"
    names = [f"blocks.{b}.attn.w_hh.{h}.1" for b in (0, 3) for h in (0, 1)]
    assert _layer_summary(names) == "blocks.*.attn.w_hh.*.1 x4"
    assert _layer_summary(["0.weight", "1.weight"]) == "0.weight, 1.weight"  # a leading number is a name


@needs_fmnist
def test_model_name_random_init(capsys, tmp_path):
    code, out, err = run(capsys, "imc-eval", "fmnist_deit_small", "--no-far", "--data", "fashion-mnist",
                         "--limit", 4, "--batch-size", 4, *FAST, "--include", "head", "-q")
    assert code == 0, err
    assert "fmnist_deit_small (random init)" in out and "crossbar " in out


@needs_fmnist
def test_zoo_name_loads_the_trained_checkpoint(capsys, tmp_path):
    code, out, err = run(capsys, "imc-eval", "fmnist_deit_tiny", "--data", "fashion-mnist",
                         "--limit", 4, "--batch-size", 4, *FAST, "--include", "head", "-q")
    assert code == 0, err
    assert "fmnist_deit_tiny (zoo checkpoint)" in out


@pytest.mark.parametrize("argv,fragments", [
    (["--sweep", "adc_bitz=4,6"], ["--sweep: unknown crossbar setting 'adc_bitz'", "adc_bits"]),
    (["--sweep", "adc_bits=4,x"], ["--sweep: adc_bits='x' is not"]),
    (["--sweep", "adc_bits=1,4"], ["--sweep adc_bits=1", "adc_bits"]),
    (["--sweep", "adc_bits"], ["--sweep takes KEY=VALUES"]),
    (["--sweep", "adc_bits=4,,6"], ["empty value"]),
    (["--sweep", "adc_bits=4,4"], ["repeated value"]),
    (["--set", "cell_bits=9"], ["--set", "cell_bits"]),
    (["--set", "stuck_at=0.1"], ["stuck_at='0.1' is not a pair like 0.01/0.02"]),
    (["--set", "adc_bits=6", "--sweep", "adc_bits=4,6"], ["conflict"]),
    (["--limit", "0"], ["--limit must be >= 1"]),
    (["--include", "blocks.7.*"], ["include pattern 'blocks.7.*' matches no emulatable layer"]),
    (["--plot", "/nonexistent-dir/p.png"], ["no such folder for --plot"]),
    (["--sweep", "adc_bits=4,6", "--sweep", "adc_bits=8"], ["--sweep adc_bits given twice"]),
    (["--dynamic", "analog"], ["--dynamic takes digital, crossbar or digital,crossbar"]),
    (["--seeds", "0"], ["--seeds must be >= 1"]),
    (["--sweep", "seed=1,2", "--seeds", "2"], ["--sweep seed and --seeds"]),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ["--device cuda"]),
    (["--set", "adc_bits=6", "--set", "adc_bits=8", "--limit", "2"], ["--set adc_bits given twice"]),  # 8 won
], ids=["unknown-key", "bad-value", "invalid-config", "no-values", "empty-value", "repeated", "bad-set", "bad-pair",
        "conflict", "limit", "include-typo", "plot-folder", "sweep-twice", "dynamic", "seeds", "seed-sweep", "device",
        "set-twice"])
def test_user_errors(capsys, teacher_ckpt, argv, fragments):
    code, _, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", *argv)
    assert_user_error(code, err, *fragments)


@pytest.mark.parametrize("command", ["imc-eval", "imc-cost"])
@pytest.mark.parametrize("outputs,fragment", [
    (["--json", "{tmp}/same.png", "--plot", "{tmp}/same.png"],
     "--json {tmp}/same.png: this command writes a JSON report, but the name's suffix says a figure; name it .json"),
    (["--json", "{tmp}/same", "--plot", "{tmp}/sub/../same", "-f"], "--json writes the same file"),
    (["--json", "{tmp}/a", "--plot", "{tmp}/a"], "--plot {tmp}/a: --json writes the same file"),
    (["--plot", "{tmp}/x.txt"], "--plot {tmp}/x.txt: matplotlib cannot write .txt files; give one of"),
    (["--json", "{tmp}/r.json", "--plot", "{tmp}/x.TXT"], "matplotlib cannot write .txt files"),
], ids=["json-named-png", "same-aliased-forced", "no-suffix", "txt", "txt-with-json"])
def test_outputs_are_checked_together_before_any_work(capsys, teacher_ckpt, tmp_path, command, outputs, fragment):
    """Two outputs that are one file, or a --plot format matplotlib cannot write: refused before the sweep or
    the costing, so nothing is written (it used to write the JSON, then fail, or with -f overwrite it)."""
    (tmp_path / "sub").mkdir()
    outputs = [o.format(tmp=tmp_path) for o in outputs]
    data = ["--data", "fashion-mnist", "--limit", 4] if command == "imc-eval" else []  # imc-cost: no data to limit
    code, _, err = run(capsys, command, teacher_ckpt, *data, "--batch-size", 4, *FASTEST, *outputs, "-q")
    assert_user_error(code, err, fragment.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"] and not list((tmp_path / "sub").iterdir())


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "imc-eval", tmp_path / "nope.safetensors", "--data", "fashion-mnist")
    assert_user_error(code, err, "nope.safetensors: no such checkpoint file, zoo name")


def test_unavailable_backend(capsys, teacher_ckpt):
    code, _, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--backend", "cuda",
                       "--device", "cpu")
    assert_user_error(code, err, "crossbar_matmul", "unavailable")


# ---------------------------------------------------------------- far imc-cost
@needs_fmnist
def test_imc_cost_table_json_plot_emulate(capsys, teacher_ckpt, far_ckpt, tmp_path):
    """Two models side by side, both dynamic modes; with --emulate the attention model is emulated with its
    K and V on crossbars in write mode and digitally in digital mode, the FAR model once for both."""
    js, png = tmp_path / "cost.json", tmp_path / "cost.png"
    code, out, err = run(capsys, "imc-cost", teacher_ckpt, far_ckpt, "--data", "fashion-mnist", "--limit", 4,
                         "--batch-size", 4, "--emulate", *FASTEST, "--json", js, "--plot", png, "-q")
    assert code == 0, err
    res = json.loads(js.read_text())
    assert [m["kind"] for m in res["models"]] == ["attention", "FAR"]
    for m in res["models"]:
        assert set(m["cost"]) == {"write", "digital"} and set(m["top1_emulated"]) == {"write", "digital"}
        for mode in ("write", "digital"):
            t = m["cost"][mode]["totals"]
            assert t["energy_uj"] > 0 and t["latency_us"] > 0 and t["area_mm2"] > 0
    far_row = res["models"][1]
    assert far_row["top1_emulated"]["write"] == far_row["top1_emulated"]["digital"]
    assert "attention's dynamic products: write" in out and "attention's dynamic products: digital" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # FAR blocks are emulated with the LSTM mapping they are costed with (default fused), said and recorded
    assert "same LSTM mapping: fused" in out and res["emulated_lstm_mapping"] == "fused"
    js2 = tmp_path / "cost_separate.json"
    code, out, err = run(capsys, "imc-cost", far_ckpt, "--data", "fashion-mnist", "--limit", 4, "--batch-size", 4,
                         "--emulate", *FASTEST, "--hw", "lstm_mapping=separate", "--json", js2, "-q")
    assert code == 0, err
    sep = json.loads(js2.read_text())
    assert "same LSTM mapping: separate" in out and sep["emulated_lstm_mapping"] == "separate"
    assert sep["models"][0]["cost"]["write"]["totals"]["energy_uj"] > far_row["cost"]["write"]["totals"]["energy_uj"]


@needs_fmnist
def test_options_without_effect_warn(capsys, teacher_ckpt):
    """imc-cost --limit without --data, eval --no-far on a checkpoint: a far: warning, and the command runs."""
    code, out, err = run(capsys, "imc-cost", teacher_ckpt, "--limit", 5, "-q")
    assert code == 0 and "far: warning: --limit 5 has no effect without --data" in err, err
    code, out, err = run(capsys, "eval", teacher_ckpt, "--no-far", "--data", "fashion-mnist", "--limit", 2, "-q")
    assert code == 0 and "far: warning: --no-far has no effect" in err, err


@needs_fmnist
def test_tensor_input_scales_warn_that_results_depend_on_the_batch(capsys, teacher_ckpt):
    """input_scale=tensor takes one input scale per product over the whole batch, so an image's emulated output (and
    the accuracy) changes with --batch-size (tests/imc/test_emulate.py shows it); the command says so, and is quiet
    with the per-row scales, whose results do not depend on the batch. imc-cost --emulate likewise."""
    code, _, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--limit", 2, "--batch-size", 2,
                       *FASTEST, "--sweep", "input_scale=row,tensor", "-q")
    assert code == 0 and "far: warning: input_scale=tensor: one input scale per product over each batch" in err, err
    assert "--batch-size (2)" in err, err
    code, _, err = run(capsys, "imc-eval", teacher_ckpt, "--data", "fashion-mnist", "--limit", 2, *FASTEST, "-q")
    assert code == 0 and "input_scale" not in err, err
    code, _, err = run(capsys, "imc-cost", teacher_ckpt, "--data", "fashion-mnist", "--limit", 2, "--batch-size", 2,
                       "--emulate", "--dynamic", "digital", *FASTEST, "--set", "input_scale=tensor", "-q")
    assert code == 0 and "far: warning: input_scale=tensor" in err and "--batch-size (2)" in err, err


@pytest.mark.parametrize("argv,fragments", [
    (["--dynamic", "analog"], ["--dynamic takes a comma-separated list"]),
    (["--hw", "dynamic=write"], ["give the dynamic mode with --dynamic"]),
    (["--emulate"], ["--emulate measures accuracy: give --data"]),
    (["--hw", "cols_per_adc=0"], ["--hw"]),
    (["--input-size", "3", "224", "224"], ["input_size 3 224 224 has 224x224x3 images but", "takes 28x28x1"]),
    (["--input-size", "1", "0", "28"], ["input_size must be 3 ints (C, H, W) >= 1, got 1 0 28"]),
    (["--input-size", "-1", "28", "28"], ["input_size must be 3 ints (C, H, W) >= 1, got -1 28 28"]),
], ids=["dynamic", "hw-dynamic", "emulate-no-data", "bad-hw", "input-size-mismatch", "input-size-zero",
        "input-size-negative"])
def test_imc_cost_user_errors(capsys, teacher_ckpt, argv, fragments):
    code, _, err = run(capsys, "imc-cost", teacher_ckpt, *argv)
    assert_user_error(code, err, *fragments)


def test_calibrating_on_the_evaluated_folder_warns(capsys, far_ckpt, tmp_path):
    # an image folder has no training split: without --calib-data the ADC ranges are fitted to the very
    # images then evaluated, which the command says; a separate --calib-data is quiet about it
    from PIL import Image

    for root in ("test", "calib"):
        for c in range(10):
            (tmp_path / root / f"class{c}").mkdir(parents=True)
            Image.new("L", (28, 28), 25 * c).save(tmp_path / root / f"class{c}" / "0.png")
    args = ["imc-eval", far_ckpt, "--data", tmp_path / "test", "--workers", 0, *FASTEST, "--set",
            "adc_range=calibrated", "--calib-images", 4, "-q"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "adc_range=calibrated without --calib-data: the ADC ranges come from the first 4 images of" in err
    code, out, err = run(capsys, *args, "--calib-data", tmp_path / "calib", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "without --calib-data" not in err
    assert json.loads((tmp_path / "r.json").read_text())["split"] is None  # a folder has no split (it said "test")


def test_imc_cost_table_keeps_its_columns_for_long_model_names(capsys, teacher_ckpt, tmp_path):
    """A model name longer than the 28-column field (deit_small_patch16_224:attention) pushed its row's columns
    out of line with the header's."""
    import shutil

    long = tmp_path / ("a_teacher_with_a_rather_long_file_name_" * 2 + ".safetensors")
    shutil.copy(teacher_ckpt, long)
    code, out, err = run(capsys, "imc-cost", teacher_ckpt, long, "-q")
    assert code == 0, err
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("model "):
            rows = lines[i + 1:i + 3]
            at = line.index(" kind") + 1
            assert all(r[at:].startswith(("attention", "FAR")) for r in rows), "\n".join([line] + rows)

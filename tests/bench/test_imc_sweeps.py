"""bench/bench_imc_sweeps.py: the ADC sweep is a grid over ADC bits and ADC ranges, the read-noise sweep runs
at the range asked for, and results of either layout (with or without the range in each setting) merge and plot."""
import json

import pytest

from conftest import load_bench  # bench/<name>.py as a module


def _load():
    return load_bench("bench_imc_sweeps")


@pytest.mark.fmnist
def test_sweeps_run_the_adc_grid_and_noise_at_the_asked_range(tmp_path):
    out = tmp_path / "s.json"
    assert _load().main(["--models", "fmnist_far_tiny", "--adc-bits", "6,8", "--adc-ranges", "max,granular",
                         "--read-noise", "0.002", "--seeds", "2", "--adc-images", "4", "--noise-images", "2",
                         "--threads", "1", "--work", str(tmp_path / "w"), "--out", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    adc, noise = r["runs"]
    assert (adc["sweep"], noise["sweep"]) == ("adc", "read_noise")
    grid = [(x["config"]["adc_bits"], x["config"]["adc_range"]) for x in adc["results"] if x["values"]]
    assert sorted(grid) == [(6, "granular"), (6, "max"), (8, "granular"), (8, "max")]
    assert adc["num_images"] == 4 and noise["num_images"] == 2
    noisy = [x for x in noise["results"] if x["values"]]
    assert [(x["config"]["read_noise"], x["config"]["adc_range"], x["seeds"]) for x in noisy] == \
        [(0.002, "granular", [0, 1])]
    assert out.with_suffix(".png").is_file()
    # the work folder's imc-eval files merge as runs, also one cut short (as a stopped sweep leaves it)
    work = sorted((tmp_path / "w").glob("*.json"))
    assert [f.name for f in work] == ["fmnist_far_tiny-adc.json", "fmnist_far_tiny-read_noise.json"]
    cut = json.loads(work[0].read_text())
    cut["results"], cut["complete"] = cut["results"][:2], False
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    merged = tmp_path / "m.json"
    assert _load().main(["--merge", str(tmp_path / "cut.json"), str(work[1]), "--out", str(merged)]) == 0
    m = json.loads(merged.read_text())
    assert [(x["model"], x["sweep"], len(x["results"])) for x in m["runs"]] == \
        [("fmnist_far_tiny", "adc", 2), ("fmnist_far_tiny", "read_noise", 2)]
    assert m["runs"][0]["results"] == adc["results"][:2] and m["runs"][1]["results"] == noise["results"]
    assert m["runs"][0]["from_imc_eval"] == "cut.json" and merged.with_suffix(".png").is_file()


def test_merge_refuses_an_imc_eval_result_of_another_sweep():
    with pytest.raises(SystemExit, match="prog_noise"):
        _load().wrap_imc_eval({"model": "m", "sweeps": [{"key": "prog_noise", "values": [0.1]}], "results": []},
                              "x.json")


def _result(range_in_values: bool) -> dict:
    def row(bits, rng, acc):
        values = {"adc_bits": bits, **({"adc_range": rng} if range_in_values else {})}
        return {"setting": f"adc_bits={bits}", "values": values, "dynamic": "digital", "accuracy": acc,
                "accuracy_std": 0.0, "config": {"adc_bits": bits, "adc_range": rng}}
    digital = {"setting": "digital", "values": {}, "dynamic": None, "accuracy": 0.9, "accuracy_std": 0.0}
    ranges = ("max", "granular") if range_in_values else ("max",)
    adc = {"model": "m", "sweep": "adc", "num_images": 10, "dynamic": None,
           "results": [digital] + [row(b, g, 0.5 + b / 100) for g in ranges for b in (6, 8)]}
    noisy = {"setting": "read_noise=0.01", "values": {"read_noise": 0.01}, "dynamic": "digital", "accuracy": 0.3,
             "accuracy_std": 0.01, "config": {"adc_bits": 8, "adc_range": "granular"}}
    noise = {"model": "m", "sweep": "read_noise", "num_images": 5, "dynamic": None, "results": [digital, noisy]}
    return {"benchmark": "imc_sweeps", "args": {"seeds": 3}, "environment": {}, "runs": [adc, noise]}


@pytest.mark.parametrize("range_in_values", [True, False])
def test_merge_plots_both_layouts(tmp_path, range_in_values):
    pytest.importorskip("matplotlib")
    mod = _load()
    part = tmp_path / "part.json"
    part.write_text(json.dumps(_result(range_in_values)))
    out = tmp_path / "merged.json"
    assert mod.main(["--merge", str(part), str(part), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert len(merged["runs"]) == 4 and out.with_suffix(".png").is_file()
    ranges = {mod._adc_range(x) for x in merged["runs"][0]["results"] if x["values"]}
    assert ranges == ({"max", "granular"} if range_in_values else {"max"})


def test_plot_names_the_image_counts_when_runs_differ(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    mod = _load()
    figures = []
    monkeypatch.setattr(mod, "save_figure", lambda fig, path, dpi: figures.append(fig))
    result = _result(True)
    other = json.loads(json.dumps(result["runs"][1]))
    other.update(model="m2", num_images=7)
    result["runs"].append(other)  # read noise: 5 images for m, 7 for m2
    mod.plot(result, tmp_path / "p.png")
    noise_ax = figures[0].axes[-1]
    labels = noise_ax.get_legend_handles_labels()[1]
    assert {"m, 5 images", "m2, 7 images"} <= set(labels)
    assert noise_ax.get_title().startswith("5/7 test images")
    adc_labels = figures[0].axes[0].get_legend_handles_labels()[1]
    assert adc_labels and all("images" not in x for x in adc_labels)  # one count there: no suffix


def test_merge_combines_a_sweep_split_over_processes(tmp_path):
    mod = _load()

    def part(levels, model="m"):
        rows = [{"setting": "digital", "values": {}, "dynamic": None, "accuracy": 0.9, "accuracy_std": 0.0}]
        rows += [{"setting": f"read_noise={v}", "values": {"read_noise": v}, "dynamic": "digital",
                  "accuracy": 0.9 - v, "accuracy_std": 0.01, "config": {"adc_bits": 8, "adc_range": "granular"}}
                 for v in levels]
        return {"model": model, "sweep": "read_noise", "num_images": 5, "dynamic": ["digital"], "seeds": 3,
                "wall_s": 1.0, "results": rows}

    runs = mod.combine([part([0.005]), part([0.001, 0.002]), part([0.002], model="other"), part([0.001])])
    assert [(r["model"], [x["setting"] for x in r["results"]]) for r in runs] == [
        ("m", ["digital", "read_noise=0.001", "read_noise=0.002", "read_noise=0.005"]),
        ("other", ["digital", "read_noise=0.002"]),
        ("m", ["digital", "read_noise=0.001"])]  # a repeated setting stays a run of its own
    assert runs[0]["wall_s"] == 2.0


def test_no_sweep_left_is_refused_before_any_work(tmp_path, capsys):
    bench = load_bench("bench_imc_sweeps")
    with pytest.raises(SystemExit) as e:  # was: a matplotlib ValueError (a plot of no panel), no JSON written
        bench.main(["--adc-images", "0", "--noise-images", "0", "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2 and "no sweep to run" in capsys.readouterr().err


@pytest.mark.parametrize("text,needle", [
    pytest.param('{"benchmark": "imc_sweeps", "runs": [', "not a JSON --merge file (", id="cut-short"),
    pytest.param('{"benchmark": "budget_curve", "points": []}', "neither a result of this benchmark", id="another"),
    pytest.param("[]", "neither a result of this benchmark", id="not-an-object"),
])
def test_merge_of_a_file_it_cannot_use_is_refused_by_name(tmp_path, text, needle):
    """Every --merge file is read before anything is written: one that is neither this benchmark's result nor an
    imc-eval JSON (cut short, another benchmark's) is one message naming it, and --out is not written."""
    good, bad, out = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "merged.json"
    good.write_text(json.dumps(_result(True)))
    bad.write_text(text)
    with pytest.raises(SystemExit) as e:
        _load().main(["--merge", str(good), str(bad), "--out", str(out)])
    assert str(e.value).startswith(f"{bad}: ") and needle in str(e.value), e.value
    assert not out.exists()

"""The README's headline tables say what their sources say: the zoo table what each bundled checkpoint records
(test top-1 in its training metadata, parameter counts of the loaded model), the cost tables what the results
file the README names beside them holds (bench/results/*.json), each figure rounded as printed. A figure copied
wrong, or left behind when its source was re-measured, fails here with the row, the README's value and the
source's."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def table_after(text: str, header: str) -> list:
    """Rows (lists of cell strings) of the markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"README has no table starting {header!r}"
    rows = []
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def source_before(text: str, header: str, pattern: str) -> Path:
    """The last results file matching `pattern` the README names before the table starting with `header`."""
    names = re.findall(pattern, text[:text.index(header)])
    assert names, f"README names no {pattern} before {header!r}"
    return ROOT / names[-1]


def model_name(cell: str) -> str:
    return re.match(r"`([^`]+)`", cell).group(1)


def mismatches(rows: list, expected: dict) -> list:
    """[(row name, README cells, expected cells)] where a row's cells differ from what the source says."""
    return [(name, got, expected[name]) for name, got in rows if got != expected[name]]


COST_HEADER = "| model | top-1 (10k) | token-mixer params | write: energy / latency / EDAP |"
DEIT_HEADER = "| EDAP vs attention, 224², T = 197 |"
GRANULAR_HEADER = "| model (2000 images) | digital → emulated"


def cost_table_errors(text: str) -> list:
    src = source_before(text, COST_HEADER, r"bench/results/imc_cost-[\w-]+\.json")
    zoo = {r["model"]: r for r in json.loads(src.read_text())["zoo"]}
    base = zoo["fmnist_deit_tiny"]["cost"]

    def cells(r):
        c = r["cost"]
        return [f"{100 * r['top1']:.2f}%", f"{r['mixer_params']:,}"] + [
            f"{c[m]['energy_uj']:.1f} / {c[m]['latency_us']:.0f} / {c[m]['edap'] / base[m]['edap']:.2f}"
            for m in ("write", "digital")]
    rows = [(model_name(r[0]), r[1:]) for r in table_after(text, COST_HEADER)]
    return mismatches(rows, {name: cells(zoo[name]) for name, _ in rows})


DEIT_ROWS = {"FAR (n = d)": "far", "FAR, 30% of the LSTM units pruned": "far-pruned-30%",
             "TReX-style, 3 of 12 encoders reuse": "trex-3-of-12", "TReX-style, 6 of 12 encoders reuse": "trex-6-of-12"}


def deit_table_errors(text: str) -> list:
    src = source_before(text, COST_HEADER, r"bench/results/imc_cost-[\w-]+\.json")  # the same run's deit rows
    shapes = json.loads(src.read_text())["deit"]
    expected = {}
    for label, kind in DEIT_ROWS.items():
        row = []
        for shape in shapes:  # DeiT-T, -S, -B: the table's columns
            by_kind = {r["kind"]: r["cost"] for r in shape["rows"]}
            row.append(" / ".join(f"{by_kind[kind][m]['edap'] / by_kind['attention'][m]['edap']:.2f}"
                                  for m in ("write", "digital")))
        expected[label] = row
    return mismatches([(r[0], r[1:]) for r in table_after(text, DEIT_HEADER)], expected)


def granular_table_errors(text: str) -> list:
    """The energy and EDAP columns of the 6-bit granular table (its accuracies come from emulated runs)."""
    src = source_before(text, GRANULAR_HEADER, r"bench/results/imc_cost_granular6-[\w-]+\.json")
    models = {r["model"]: r["cost"] for r in json.loads(src.read_text())["models"]}
    base = models["fmnist_deit_tiny"]

    def cells(c):
        return [f"{c[m]['totals']['energy_uj']:.1f} / {c[m]['totals']['edap'] / base[m]['totals']['edap']:.2f}"
                for m in ("write", "digital")]
    rows = [(model_name(r[0]), r[2:]) for r in table_after(text, GRANULAR_HEADER)]
    return mismatches(rows, {name: cells(models[name]) for name, _ in rows})


@pytest.mark.parametrize("check", [cost_table_errors, deit_table_errors, granular_table_errors],
                         ids=["zoo-cost", "deit-edap", "granular6-cost"])
def test_cost_tables_match_their_results_file(check):
    assert check(README.read_text()) == []


def test_the_checks_catch_a_figure_copied_wrong():
    """Each check fails on the README with one of its figures changed (so the test above can fail)."""
    text = README.read_text()
    for check, old, new in [(cost_table_errors, "| 29.5 / 883 / 1.44 |", "| 29.5 / 883 / 1.45 |"),
                            (deit_table_errors, "| 0.82 / 1.72 |", "| 0.82 / 1.73 |"),
                            (granular_table_errors, "| 17.3 / 1.33 |", "| 17.3 / 1.34 |")]:
        assert text.count(old) == 1, old
        assert len(check(text.replace(old, new))) == 1


def test_zoo_table_matches_the_checkpoints():
    import far
    from far.models import mixer_params, param_counts, zoo_path

    header = "| name | what | test top-1 (10k) | parameters | token-mixer params |"
    bad = []
    for row in table_after(README.read_text(), header):
        name = model_name(row[0])
        model = far.load(zoo_path(name))
        top1 = model.far_checkpoint["metadata"]["training"]["test_accuracy"]
        want = [f"{100 * top1:.2f}%", f"{param_counts(model)['kept']:,}", f"{mixer_params(model):,}"]
        if row[2:] != want:
            bad.append((name, row[2:], want))
    assert bad == []


def test_fidelity_table_matches_the_checkpoints():
    """The current zoo students' rows (not the "previous" ones) against each checkpoint's fidelity record."""
    import far
    from far.models import zoo_path

    header = "| model | isolated, blocks 0–3 | in the model, blocks 0–3 | top-1 agreement |"
    bad = []
    for row in table_after(README.read_text(), header):
        if not row[0].startswith("`"):
            continue  # a previous model: no longer shipped
        name = model_name(row[0])
        f = far.load(zoo_path(name)).far_checkpoint["metadata"]["fidelity"]
        want = [" / ".join(f"{b[kind]['cos']:.3f}" for b in f["blocks"]) for kind in ("isolated", "in_model")]
        want.append(f"{100 * f['agreement']:.2f}%")
        if row[1:] != want:
            bad.append((name, row[1:], want))
    assert bad == []


def test_analysis_table_matches_its_json():
    header = "| student | block | isolated: cos along tokens |"
    bad = []
    for row in table_after(README.read_text(), header):
        name, block = model_name(row[0]), row[1]
        report = json.loads((ROOT / "bench" / "results" / f"analysis-{name}" / "analysis.json").read_text())
        entry = report["mean"] if block == "mean" else report["blocks"][int(block)]
        iso, inm = entry["isolated"], entry["in_model"]
        want = [f"{iso['cos']:.4f}", f"{iso['token_cos']:.4f}", f"{iso['rel_mse']:.4f}", f"{iso['scale']:.3f}",
                f"{inm['cos']:.4f}", f"{inm['token_cos']:.4f}"]
        if row[2:] != want:
            bad.append((name, block, row[2:], want))
    assert bad == []

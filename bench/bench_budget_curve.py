"""Accuracy against crossbar arrays: FAR pruned to several array budgets beside the attention teacher and
TReX-style reuse plans, on the Fashion-MNIST test set (JSON + plot).

Points (token-mixer arrays = the static arrays of every block's token mixer plus, for attention, the
arrays its K and V are written into per image — far.imc.cost at ISAAC-like defaults; the JSON also has
whole-model arrays, parameters kept, and the arrays with diagonal packing):
- the teacher `fmnist_deit_tiny` and the bundled FAR / TReX zoo models, as trained (their recipes: README);
- FAR budget sweep: `fmnist_far_tiny` pruned with `far.prune(budget="mixer-arrays=B", balance=True,
  align=4)` for each B (no further Hoyer training: the distilled model's own group norms rank the
  units), then a masked fine-tune of --finetune-epochs (CE): a cheap curve, below what a full recipe
  (the zoo's xs model: rounds of Hoyer training, then distillation) reaches at the same size;
- TReX sweep: the teacher with 1, 2, 3 blocks reusing their predecessor's attention (far.reuse,
  --reuse-epochs of stage 1 and of stage 2 each).
Each point is saved to the JSON as soon as it is measured; a rerun with the same --out (and the same epochs,
test images and training limit) skips the points already there.

    python bench/bench_budget_curve.py                        # about 40 min on 2 CPU cores (1 thread)
    python bench/bench_budget_curve.py --quick                # a smoke run: 2 budgets, 1 plan, 500 images
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (240, 200, 168, 140, 110, 84)
PLANS = ({3: 2}, {3: 2, 1: 0}, {1: 0, 2: 0, 3: 0})  # a source keeps its own attention
ZOO = ("fmnist_deit_tiny", "fmnist_far_tiny", "fmnist_far_tiny_pruned", "fmnist_far_tiny_xs", "fmnist_trex_tiny")


def describe(model) -> dict:
    """Sizes of a model: arrays (token mixers / whole model, packing none and diagonal), parameters."""
    from far.imc.cost import HardwareSpec, model_cost
    from far.models import param_counts

    out = {"params": param_counts(model)}
    for packing in ("none", "diagonal"):
        rep = model_cost(model, hw=HardwareSpec(packing=packing))
        mixer = sum(r.arrays + r.dynamic_arrays for r in rep.rows if r.kind in ("far", "attention", "reuse"))
        out[packing] = {"mixer_arrays": mixer, "arrays": rep.totals["arrays"] + rep.totals["dynamic_arrays"],
                        "array_utilisation": rep.totals["array_utilisation"], "energy_uj": rep.totals["energy_uj"],
                        "latency_us": rep.totals["latency_us"], "edap": rep.totals["edap"]}
    return out


def top1(model, test) -> float:
    from far.evaluate import evaluate

    return evaluate(model, test, batch_size=250, device="cpu")["accuracy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/budget_curve-<host>-<date>.json)")
    p.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",")], default=list(BUDGETS),
                   help="token-mixer array budgets for the FAR sweep, comma-separated")
    p.add_argument("--finetune-epochs", type=float, default=0.5, help="masked fine-tune after each budget's pruning")
    p.add_argument("--reuse-epochs", type=float, default=0.5, help="stage-1 and stage-2 epochs of each TReX plan")
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 budgets, 1 plan, 500 test images, 256 training images")
    args = p.parse_args(argv)

    import far
    from far.data import fashion_mnist
    from far.errors import ConfigError
    from far.models import zoo_path
    from far.utils.env import environment, result_filename
    from far.utils.fs import read_json, write_json

    torch.set_num_threads(args.threads)
    limit = None
    budgets, plans = args.budgets, PLANS
    if args.quick:
        budgets, plans, args.test_images, limit = budgets[2:4], PLANS[:1], 500, 256
    out = args.out or (Path(__import__("tempfile").mkdtemp()) / "budget_curve.json" if args.quick
                       else RESULTS / result_filename("budget_curve"))
    result = {"environment": environment(args.threads), "points": []}
    if out.exists():  # resumed from: it must be this benchmark's result
        try:
            result = read_json(out, "--out file")
        except ConfigError as e:
            raise SystemExit(str(e)) from None
        if not (isinstance(result, dict) and isinstance(result.get("points"), list)):
            raise SystemExit(f"{out}: not a result of this benchmark (no 'points' list) to resume; write to "
                             "another --out")
    measured = {"finetune_epochs": args.finetune_epochs, "reuse_epochs": args.reuse_epochs,
                "test_images": args.test_images, "train_limit": limit}
    old = result.get("settings", {})
    changed = [f"{k} {old[k]} -> {v}" for k, v in measured.items() if k in old and old[k] != v]
    if changed:  # its points would be kept beside new ones measured otherwise, under the new settings
        raise SystemExit(f"{out} holds points measured with other settings ({', '.join(changed)}): resume with "
                         "the same settings or write to another --out")
    before = list(old.get("budgets", []))
    result.update(settings={"budgets": before + [b for b in budgets if b not in before], **measured})
    done = {pt["name"] for pt in result["points"]}
    test = fashion_mnist("test", limit=args.test_images)
    train = fashion_mnist("train", limit=limit)

    def add(name, family, model, **extra):
        t0 = time.perf_counter()
        pt = {"name": name, "family": family, "top1": top1(model, test), **describe(model), **extra,
              "eval_s": time.perf_counter() - t0}
        result["points"].append(pt)
        write_json(out, result)
        print(f"{name:<28} top-1 {100 * pt['top1']:.2f}%  mixer arrays {pt['none']['mixer_arrays']} "
              f"(diagonal {pt['diagonal']['mixer_arrays']})  mixer params {pt['params']['mixer_kept']:,}", flush=True)

    def present(name):
        try:
            return Path(zoo_path(name)).is_file()
        except (ConfigError, FileNotFoundError):
            return False

    for name in ZOO:
        if name not in done and present(name):
            family = {"fmnist_deit_tiny": "teacher", "fmnist_trex_tiny": "trex"}.get(name, "far")
            add(name, family + "-zoo", far.load(zoo_path(name)))
    teacher = far.load(zoo_path("fmnist_deit_tiny"))
    student = far.load(zoo_path("fmnist_far_tiny"))
    cfg = far.TrainConfig(epochs=0, batch_size=128, lr=3e-4, warmup_epochs=0.05, progress=True, seed=0)
    for b in budgets:
        name = f"far-mixer-arrays-{b}"
        if name in done:
            continue
        t0 = time.perf_counter()
        model = far.prune(student, train, config=cfg, budget=f"mixer-arrays={b}", balance=True, align=4,
                          finetune_epochs=args.finetune_epochs, finetune_lr=3e-4)
        add(name, "far", model, budget=b, train_s=time.perf_counter() - t0,
            masked_top1=model.far_metadata["pruning"]["masked_test_accuracy"],
            hidden_sizes=[m.hidden_sizes.tolist() for _, m in far.far_modules(model)])
    for plan in plans:
        name = "trex-" + "-".join(f"{k}from{v}" for k, v in sorted(plan.items()))
        if name in done:
            continue
        t0 = time.perf_counter()
        model = far.reuse(teacher, train, plan=plan, config=far.TrainConfig(epochs=args.reuse_epochs, batch_size=128,
                                                                            progress=True, seed=0),
                          stage2_epochs=args.reuse_epochs)
        add(name, "trex", model, plan={str(k): v for k, v in plan.items()}, train_s=time.perf_counter() - t0)
    result["plot"] = plot(result, out.with_suffix(".png"))
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def plot(result: dict, path: Path):
    from far.utils.plot import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    pts = result["points"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    style = {"teacher-zoo": ("*", "black", 14), "far": ("o", "tab:blue", 6), "far-zoo": ("s", "tab:blue", 8),
             "trex": ("^", "tab:red", 6), "trex-zoo": ("D", "tab:red", 8)}
    for ax, key, label in ((axes[0], lambda q: q["none"]["mixer_arrays"], "token-mixer crossbar arrays (static + K/V)"),
                           (axes[1], lambda q: q["params"]["mixer_kept"] / 1e3, "token-mixer parameters (thousands, kept)")):
        for fam in ("far", "trex"):
            line = sorted((q for q in pts if q["family"] == fam), key=key)
            if line:
                ax.plot([key(q) for q in line], [100 * q["top1"] for q in line], "-", color=style[fam][1], alpha=0.5,
                        label="FAR pruned to a budget (+ short fine-tune)" if fam == "far" else "TReX plans (short training)")
        for q in pts:
            m, c, s = style[q["family"]]
            ax.plot(key(q), 100 * q["top1"], m, color=c, markersize=s)
            if q["family"].endswith("zoo"):
                ax.annotate(q["name"].replace("fmnist_", ""), (key(q), 100 * q["top1"]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
        teacher = next((q for q in pts if q["family"] == "teacher-zoo"), None)
        if teacher:
            ax.axvline(key(teacher), color="black", lw=0.6, ls=":")
            ax.axhline(100 * teacher["top1"] - 1, color="gray", lw=0.6, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    env = result.get("environment", {})
    fig.suptitle(f"Fashion-MNIST, {result['settings']['test_images']} test images: accuracy vs crossbar arrays "
                 f"(dotted: the teacher; dashed: teacher - 1 point) — {env.get('cpu_model', '')}, commit "
                 f"{(env.get('git_commit') or '')[:7]}{'+' if env.get('git_dirty') else ''}",
                 fontsize=9)
    save_figure(fig, path)
    return str(path)


if __name__ == "__main__":
    raise SystemExit(main())

"""What the padded storage of pruned FAR blocks costs: memory and CPU time against the ragged alternatives.

A pruned FAR block in storage "padded" holds every (head, direction) padded to the block's widest one, so that
all heads run as one batched input GEMM and one scan launch (the padding is exactly zero; the scans skip padded
units). Two ragged alternatives are measured beside it:
- storage "ragged" (far.set_storage): kept units only in memory, concatenated as a checkpoint stores them; each
  forward gathers the padded operands (one index_select per tensor) and runs the same kernels;
- per-head modules: one single-head module per head, each exactly as wide as its own units (forward and
  backward padded to the wider of the two only), run one after another.
The script checks all three compute the same outputs, then times the whole models (median of interleaved
rounds, far_kernels.benchmark.time_fn) on the CPU backend and counts the parameters each holds in memory.

    python bench/bench_padding.py                                  # the zoo's pruned models, ~2 min
    python bench/bench_padding.py --models fmnist_far_tiny_xs --batch 64 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn as nn

RESULTS = Path(__file__).resolve().parent / "results"


class RaggedFAR(nn.Module):
    """The FAR block `m` as H single-head FARAttentions of their own widths, then m's proj."""

    def __init__(self, m):
        super().__init__()
        import far

        d = m.head_dim
        self.heads = nn.ModuleList()
        for h in range(m.num_heads):
            kf, kb = int(m.hidden_sizes[0, h]), int(m.hidden_sizes[1, h])
            one = far.FARAttention(m.dim, 1, head_dim=d, hidden_sizes=[[kf], [kb]], dim_out=d, backend=m.backend)
            with torch.no_grad():
                one.pre_proj.weight.copy_(m.pre_proj.weight[h * d:(h + 1) * d])
                one.pre_proj.bias.copy_(m.pre_proj.bias[h * d:(h + 1) * d])
                for r in (0, 1):
                    one.set_lstm_params(r, 0, *m.lstm_params(r, h))
                one.set_head_proj_params(0, *m.head_proj_params(h))
                one.proj = nn.Identity()
            self.heads.append(one)
        self.proj = m.proj

    def forward(self, x, **kwargs):  # timm passes attn_mask=None
        return self.proj(torch.cat([head(x, **kwargs) for head in self.heads], dim=-1))


def ragged_twin(model):
    import far

    twin = copy.deepcopy(model)
    for name, m in far.far_modules(twin):
        parent = twin.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], RaggedFAR(m))
    return twin.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", nargs="+", default=["fmnist_far_tiny_pruned", "fmnist_far_tiny_xs"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--backend", default="cpp")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import far
    from far.models import param_counts, zoo_path
    from far.utils.env import environment, result_filename
    from far.utils.fs import write_json
    from far_kernels.benchmark import time_fn

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        model = far.load(zoo_path(name) if not Path(name).is_file() else name).eval()
        far.set_backend(model, args.backend)
        variants = {"padded": model, "ragged_storage": far.set_storage(copy.deepcopy(model), "ragged"),
                    "per_head": ragged_twin(model)}
        torch.manual_seed(0)
        x = torch.randn(args.batch, *model.pretrained_cfg["input_size"])
        with torch.inference_mode():
            ref = model(x)
            err = {key: (mod(x) - ref).abs().max().item() for key, mod in variants.items()}
            times = {key: [] for key in variants}
            for _ in range(args.rounds):  # interleaved, so load changes hit every variant
                for key, mod in variants.items():
                    times[key].append(time_fn(lambda: mod(x), warmup=1, warmup_s=0.0, reps=3)["ms"])
        counts = param_counts(model)
        memory = {key: sum(p.numel() for p in mod.parameters()) for key, mod in variants.items()}
        ms = {key: statistics.median(v) for key, v in times.items()}
        row = {"model": name, "batch": args.batch, "backend": args.backend, "max_abs_diff": err, "ms": ms,
               "round_ms": times, "params_kept": counts["kept"], "params_in_memory": memory,
               "time_vs_padded": {key: v / ms["padded"] for key, v in ms.items()},
               "memory_vs_kept": {key: v / counts["kept"] for key, v in memory.items()},
               "hidden_sizes": [m.hidden_sizes.tolist() for _, m in far.far_modules(model)]}
        rows.append(row)
        print(f"{name} (kept {counts['kept']:,} parameters):", flush=True)
        for key in variants:
            print(f"  {key:<15} {ms[key]:7.2f} ms ({row['time_vs_padded'][key]:.3f}x padded)  "
                  f"{memory[key]:>9,} parameters in memory ({row['memory_vs_kept'][key]:.3f}x kept)  "
                  f"max |diff| {err[key]:.1e}", flush=True)
    out = args.out or RESULTS / result_filename("padding")
    write_json(out, {"environment": environment(args.threads), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

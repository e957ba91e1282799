"""Pieces the training commands share: datasets for a model, the final save, the end-of-run report."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from far.hardware import device_name
from far.train.engine import Dist, TrainConfig, TrainError, TrainResult, config_dict, plot_history, summary_table


def datasets(spec: str, model: nn.Module, cfg: TrainConfig, val: Optional[str] = None):
    """(train set, eval set) for `spec` ("fashion-mnist" or an image folder) checked against the model.
    Fashion-MNIST evaluates on its 10k test split; a folder on `val` (a second folder) or not at all."""
    from far.data import DatasetError, make_dataset

    try:
        train_set = make_dataset(spec, "train", model, limit=cfg.limit)
        if str(spec).lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
            eval_set = make_dataset(spec, "test", model, limit=cfg.eval_limit)
        elif val is not None:
            eval_set = make_dataset(val, "test", model, limit=cfg.eval_limit, train=False)
        else:
            eval_set = None
    except (DatasetError, FileNotFoundError) as e:
        raise TrainError(str(e)) from e
    return train_set, eval_set


def run_metadata(command: str, cfg: TrainConfig, d: Dist, result: TrainResult, **extra) -> dict:
    """JSON metadata stored in the checkpoint: how it was trained, on what, and how long it took."""
    dev = device_name(d.device)
    return {"training": {"command": command, "config": {k: v for k, v in config_dict(cfg).items()
                                                         if k not in ("progress", "resume", "out_dir")},
                         "processes": d.world, "device": dev, "threads": torch.get_num_threads(),
                         "seconds": round(result.seconds, 1), "steps": result.steps,
                         "test_accuracy": result.final_accuracy,
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            **extra}


def finish(model: nn.Module, output: Optional[str], cfg: TrainConfig, d: Dist, result: TrainResult,
           command: str, title: str, rows: List[Tuple[str, str]], metadata: dict,
           logs: Optional[str] = None) -> dict:
    """Save the model (rank 0, atomically, with metadata), write summary.json and the curves PNG,
    print the summary table. Returns the summary dict."""
    import far

    out = Path(cfg.out_dir)
    summary = {"command": command, "completed": result.completed, "steps": result.steps,
               "seconds": round(result.seconds, 1), "test_accuracy": result.final_accuracy,
               "output": None, **{k: v for k, v in rows}}
    if not d.main:
        return summary
    if not result.completed:
        print(f"stopped after step {result.steps} (--max-steps); resume with --resume "
              f"--out-dir {cfg.out_dir}", flush=True)
        return summary
    if output:
        far.save(model, output, metadata=metadata)
        summary["output"] = os.fspath(output)
    why = plot_history(result.history, out / "curves.png", title)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    table = [("test top-1", f"{100 * result.final_accuracy:.2f}%" if result.final_accuracy is not None else "n/a"),
             ("steps", str(result.steps)), ("time", f"{result.seconds:.0f} s"), *rows,
             ("checkpoint", os.fspath(output) if output else "(not saved: no -o)"),
             ("metrics", logs or os.fspath(out / "metrics.jsonl")),
             ("curves", os.fspath(out / "curves.png") if why is None else f"not written: {why}")]
    print(f"\n{title}\n" + summary_table(table), flush=True)
    return summary

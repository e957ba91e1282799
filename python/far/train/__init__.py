"""The training loop (DDP, resume, EMA, AMP, metrics) that far.methods run on. No argparse, no tables."""
from far.train.loop import (Dist, RunReport, Task, TrainConfig, TrainResult, cleanup_distributed, join_histories,
                            plot_history, run_metadata, setup_distributed, stage_config, train)

__all__ = ["Dist", "RunReport", "Task", "TrainConfig", "TrainResult", "cleanup_distributed", "join_histories",
           "plot_history", "run_metadata", "setup_distributed", "stage_config", "train"]

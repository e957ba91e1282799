"""The training loop: schedule, kill-and-resume == uninterrupted, 2-process gloo DDP == one process
with the same global batch, checkpoints, errors, and the train-teacher / finetune commands."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import far
from far.data import fashion_mnist
from far.errors import ConfigError as TrainError
from far.train import TrainConfig
from far.train.loop import lr_at

SMALL = ["--limit", "64", "--eval-limit", "100", "-q", "--threads", "1"]


def far_cli(*args, env=None, **kw):
    e = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "far.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=600, **kw)


def tensors(path):
    return load_file(str(path))


def assert_same_tensors(a, b, atol=0.0):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if atol == 0.0:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)


def test_lr_schedule():
    total, warm = 100, 10
    lrs = [lr_at(s, total, warm, 1e-3, 1e-5) for s in range(total)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05) and lr_at(total, total, warm, 1e-3, 1e-5) == pytest.approx(1e-5)
    assert lr_at(0, 10, 0, 1e-3, 0) == pytest.approx(1e-3)


@pytest.mark.parametrize("field,value,msg", [("epochs", 0, "epochs"), ("batch_size", 0, "batch size"),
                                             ("lr", -1, "lr"), ("ema", 1.0, "ema"), ("amp", "fp8", "amp")])
def test_config_validation(field, value, msg):
    with pytest.raises(TrainError, match=msg):
        TrainConfig(**{field: value}).validate()


def train_teacher(cfg: TrainConfig, output=None):
    """far.train_classifier on a fresh fmnist_deit_tiny (initialized from cfg.seed), saved when complete."""
    torch.manual_seed(cfg.seed)
    model = far.create_model("fmnist_deit_tiny", far=False)
    model = far.train_classifier(model, fashion_mnist("train", limit=cfg.limit),
                                 eval_data=fashion_mnist("test", limit=cfg.eval_limit), config=cfg)
    if model.far_run.completed and output is not None:
        far.save(model, output)
    return model.far_run


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    base = dict(epochs=2, batch_size=16, limit=64, eval_limit=50, progress=False, ckpt_every=3, log_every=1, ema=0.9)
    full = train_teacher(TrainConfig(out_dir=str(tmp_path / "a"), **base), tmp_path / "a.safetensors")
    assert full.completed and full.steps == 8
    part = train_teacher(TrainConfig(out_dir=str(tmp_path / "b"), max_steps=5, **base), tmp_path / "b.safetensors")
    assert not part.completed and part.steps == 5 and not (tmp_path / "b.safetensors").exists()
    rest = train_teacher(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **base), tmp_path / "b.safetensors")
    assert rest.completed and rest.steps == 8
    assert_same_tensors(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    rows_a = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_a if r["kind"] == "step"] == [r["loss"] for r in rows_b if r["kind"] == "step"]
    # a different run's checkpoint is refused with the reason
    with pytest.raises(TrainError, match="different run.*lr"):
        train_teacher(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **{**base, "ema": 0.9}, lr=5e-4))
    with pytest.raises(TrainError, match="no checkpoint"):
        train_teacher(TrainConfig(out_dir=str(tmp_path / "none"), resume=True, **base))


def test_fp16_on_cpu_scales_its_loss_and_resumes_with_the_scale(tmp_path, recwarn):
    """--amp fp16 on CPU: a CPU loss scaler (a "cuda" one disabled itself with a UserWarning), kept in last.pt
    and loaded on resume (stop + resume == uninterrupted); a damaged scale is refused."""
    torch.set_num_threads(1)
    base = dict(epochs=1, batch_size=16, limit=48, eval_limit=16, progress=False, log_every=1, amp="fp16")
    full = train_teacher(TrainConfig(out_dir=str(tmp_path / "a"), **base), tmp_path / "a.safetensors")
    assert full.completed and full.steps == 3
    assert not [w for w in recwarn if "GradScaler" in str(w.message)], [str(w.message) for w in recwarn]
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert 0 < state["scaler"]["scale"] <= 65536.0 and state["scaler"]["_growth_tracker"] >= 1
    part = train_teacher(TrainConfig(out_dir=str(tmp_path / "b"), max_steps=2, **base))
    assert not part.completed
    bad = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    bad["scaler"]["scale"] = -1.0
    torch.save(bad, tmp_path / "bad.pt")
    good = (tmp_path / "b" / "last.pt").read_bytes()
    (tmp_path / "b" / "last.pt").write_bytes((tmp_path / "bad.pt").read_bytes())
    with pytest.raises(far.CheckpointError, match="loss scaler state is not a positive finite scale"):
        train_teacher(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **base))
    (tmp_path / "b" / "last.pt").write_bytes(good)
    rest = train_teacher(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **base), tmp_path / "b.safetensors")
    assert rest.completed and rest.steps == 3
    assert_same_tensors(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_resume_on_another_training_set_is_refused(tmp_path):
    """The training set's size is part of a run's identity (it sets the steps and the LR schedule)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def images(n):
        return torch.utils.data.TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

    def run(n, **kw):
        torch.manual_seed(0)
        model = far.create_model("fmnist_deit_tiny", far=False, depth=1, embed_dim=16, num_heads=2)
        cfg = TrainConfig(epochs=1, batch_size=8, progress=False, augment=False, out_dir=str(tmp_path / "r"), **kw)
        return far.train_classifier(model, images(n), config=cfg).far_run

    assert not run(32, max_steps=1).completed
    with pytest.raises(TrainError, match="different run.*train_images=32 vs 48"):
        run(48, resume=True)
    assert run(32, resume=True).completed


def test_new_run_refuses_an_unfinished_runs_state(tmp_path):
    """A run stopped early (or killed) leaves last.pt and metrics.jsonl; a new run in the same folder without
    resume must not silently replace them: refused unless force, which starts over. A finished run's folder
    is reused as before."""
    torch.set_num_threads(1)
    run = tmp_path / "r"
    base = dict(epochs=1, batch_size=16, limit=32, eval_limit=16, progress=False, log_every=1)
    part = train_teacher(TrainConfig(out_dir=str(run), max_steps=1, **base))
    assert not part.completed and part.steps == 1
    state, metrics = (run / "last.pt").read_bytes(), (run / "metrics.jsonl").read_text()
    for changes in ({}, {"lr": 5e-4}):  # the same settings or another run's: either would lose the state
        with pytest.raises(TrainError, match=r"last\.pt: an unfinished run's state \(stopped at step 1 of 2\); "
                                             r"continue it with --resume.*-f/--force \(force=True in TrainConfig\) to start over"):
            train_teacher(TrainConfig(out_dir=str(run), **{**base, **changes}))
        assert (run / "last.pt").read_bytes() == state and (run / "metrics.jsonl").read_text() == metrics
    fresh = train_teacher(TrainConfig(out_dir=str(run), force=True, **base))  # -f: start over
    assert fresh.completed and fresh.steps == 2
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2]  # a fresh log, not appended to the old
    again = train_teacher(TrainConfig(out_dir=str(run), **base))  # a finished run's folder: reused as before
    assert again.completed and torch.load(run / "last.pt", weights_only=True)["total"] == 2


@pytest.mark.parametrize("state,why", [
    ({"step": 2, "total": 2}, None),
    ({"step": 1, "total": 2}, "stopped at step 1 of 2"),
    ({"step": 2}, "at step 2; this state does not say whether the run finished"),  # written before "total"
    (b"garbage", None),
], ids=["finished", "unfinished", "no-total", "garbage"])
def test_fresh_run_check_looks_into_stage_folders(tmp_path, state, why):
    """The command line checks the run folder and the stage folders of multi-stage methods (distill's
    stage1/stage2, prune's round1/reg) before any work; force or resume skip the check. State that cannot be
    read is refused too, pointing to -f alone (--resume would refuse it as well)."""
    from far.train.loop import check_fresh_run

    for where in ("last.pt", "stage2/last.pt", "round1/finetune/last.pt"):
        run = tmp_path / where.replace("/", "_")
        (run / where).parent.mkdir(parents=True)
        if isinstance(state, bytes):
            (run / where).write_bytes(state)
        else:
            torch.save({"version": 1, **state}, run / where)
        cfg = TrainConfig(out_dir=str(run))
        if isinstance(state, bytes):
            with pytest.raises(TrainError, match=f"{run / where}: a training state that cannot be read; pass "
                                                 "-f/--force") as e:
                check_fresh_run(cfg)
            assert "--resume" not in str(e.value)
        elif why is None:
            check_fresh_run(cfg)
        else:
            with pytest.raises(TrainError, match=f"{run / where}: an unfinished run's state \\({why}\\)"):
                check_fresh_run(cfg)
        check_fresh_run(TrainConfig(out_dir=str(run), resume=True))
        if where != "last.pt":  # train() itself checks its own folder only (a stage's)
            check_fresh_run(cfg, stages=False)
        (run / where).with_name("metrics.jsonl").write_text("{}\n")
        check_fresh_run(TrainConfig(out_dir=str(run), force=True))  # -f: what it would refuse is replaced
        assert (run / where).exists() == (why is None and not isinstance(state, bytes))
        assert (run / where).with_name("metrics.jsonl").exists() == (run / where).exists()
        check_fresh_run(cfg)


def test_train_teacher_cli_refuses_to_start_over_an_unfinished_run(tmp_path, capsys):
    from far.cli import main

    args = ["train-teacher", "--epochs", "1", "--batch-size", "16", "--limit", "32", "--eval-limit", "16", "-q",
            "--threads", "1", "--out-dir", str(tmp_path / "r")]
    assert main([*args, "--max-steps", "1"]) == 0
    cap = capsys.readouterr()
    assert "resume with --resume" in cap.out
    # said before the run starts: no -o saves nothing; a warm-up as long as the run never reaches --lr
    assert "far: warning: no -o/--output: the trained model will not be saved" in cap.err
    assert "--warmup-epochs 1 is not below --epochs 1: the learning rate rises for the whole run" in cap.err
    state = (tmp_path / "r" / "last.pt").read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("far: error: ") and err.count("\n") == 1, err
    assert "unfinished run's state (stopped at step 1 of 2)" in err and "--resume" in err and "-f/--force" in err
    assert (tmp_path / "r" / "last.pt").read_bytes() == state and not (tmp_path / "r" / "summary.json").exists()
    assert main([*args, "-f"]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 2
    assert main(args) == 0  # the run is finished: a new one may reuse its folder
    out = capsys.readouterr().out  # the summary names the metrics file it wrote (it printed a glob)
    assert str(tmp_path / "r" / "metrics.jsonl") in out and "**" not in out


def test_unreadable_state_and_a_folder_named_last_pt(tmp_path, capsys):
    """--resume on a state it cannot read points to -f (the way to start over), and -f does start over; a
    folder where the state goes is refused before any training, not at the first save."""
    from far.cli import main

    run = tmp_path / "r"
    args = ["train-teacher", "--epochs", "0.5", "--batch-size", "16", *SMALL, "--out-dir", str(run)]
    run.mkdir()
    (run / "last.pt").write_bytes(b"garbage")
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot read it" in err and "run with -f/--force instead of --resume" in err, err
    assert main([*args, "-f"]) == 0
    capsys.readouterr()
    other = tmp_path / "o"
    (other / "last.pt").mkdir(parents=True)
    for extra in ([], ["--resume"], ["-f"]):
        assert main([*args[:-1], str(other), *extra]) == 2
        err = capsys.readouterr().err
        assert f"{other / 'last.pt'} is not a file" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(other)) == ["last.pt"]


def test_force_clears_the_state_of_a_stage_it_skips(tmp_path, capsys):
    """-f says the unfinished state is replaced: a stage the forced run skips (0 epochs) must not keep it, or
    every later run in the folder is refused."""
    from far.cli import main

    teacher = tmp_path / "t.safetensors"
    torch.manual_seed(0)
    far.save(far.create_model("fmnist_deit_tiny", far=False, depth=2, embed_dim=16, num_heads=2), teacher)
    run = tmp_path / "r"
    args = ["distill", "--teacher", str(teacher), "--hidden-size", "4", "--batch-size", "16", *SMALL,
            "--out-dir", str(run)]
    assert main([*args, "--max-steps", "1", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert (run / "stage1" / "last.pt").is_file()
    assert main([*args, "--epochs", "0", "-f", "-o", str(tmp_path / "b.safetensors")]) == 0
    assert not (run / "stage1" / "last.pt").exists()
    capsys.readouterr()
    assert main([*args, "--epochs", "0", "-o", str(tmp_path / "c.safetensors")]) == 0, capsys.readouterr().err


def test_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL a real `far train-teacher` process mid-epoch, resume it, compare with an uninterrupted run."""
    args = ["train-teacher", "--epochs", "2", "--batch-size", "8", "--ckpt-every", "2", "--log-every", "1", *SMALL]
    ok = far_cli(*args, "--out-dir", tmp_path / "a", "-o", tmp_path / "a.safetensors")
    assert ok.returncode == 0, ok.stderr
    run_b = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-m", "far.cli", *args, "--out-dir", str(run_b), "-o",
                          str(tmp_path / "b.safetensors")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_b / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # wait for step 11 of 16 (epoch 2, mid-epoch)
        if metrics.exists() and sum(1 for r in metrics.read_text().splitlines() if '"step"' in r) >= 11:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "b.safetensors").exists()
    state = torch.load(run_b / "last.pt", weights_only=True)
    assert 8 <= state["step"] < 16
    res = far_cli(*args, "--out-dir", run_b, "-o", tmp_path / "b.safetensors", "--resume")
    assert res.returncode == 0, res.stderr
    assert_same_tensors(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    """torchrun, 2 CPU processes x 8 images == 1 process x 16 images (same global batches: the
    DistributedSampler interleaves one permutation), up to float summation order."""
    common = ["train-teacher", "--epochs", "1", "--no-augment", "--label-smoothing", "0", *SMALL]
    env = {"OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "far.cli", *common, "--batch-size", "8", "--out-dir", str(tmp_path / "ddp"),
                          "-o", str(tmp_path / "ddp.safetensors")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "processes   2" in ddp.stdout
    one = far_cli(*common, "--batch-size", "16", "--out-dir", tmp_path / "one", "-o", tmp_path / "one.safetensors",
                  env=env)
    assert one.returncode == 0, one.stderr
    assert_same_tensors(tmp_path / "ddp.safetensors", tmp_path / "one.safetensors", atol=2e-5)
    s_ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s_ddp["steps"] == s_one["steps"] == 4
    assert abs(s_ddp["test_accuracy"] - s_one["test_accuracy"]) <= 0.02  # same model, sharded evaluation
    # the logged loss is the mean over both processes' halves of each batch (it was rank 0's half alone)
    logged = [[r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "step"] for run in ("ddp", "one")]
    assert len(logged[0]) == len(logged[1]) >= 1
    torch.testing.assert_close(torch.tensor(logged[0]), torch.tensor(logged[1]), rtol=1e-4, atol=1e-5)


def test_train_teacher_cli_output_and_errors(tmp_path, capsys):
    from far.cli import main

    out = tmp_path / "t.safetensors"
    code = main(["train-teacher", "--epochs", "0.5", "--batch-size", "16", *SMALL, "--out-dir", str(tmp_path / "r"),
                 "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "test top-1" in text
    m = far.load(out)
    assert m.pretrained_cfg["input_size"] == (1, 28, 28) and m.pretrained_cfg["num_classes"] == 10
    assert m.far_checkpoint["metadata"]["training"]["command"] == "train-teacher"
    for curves in ("curves.png", "summary.json", "metrics.jsonl", "last.pt"):
        assert (tmp_path / "r" / curves).is_file()
    assert main(["train-teacher", "--epochs", "0.5", *SMALL, "-o", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["train-teacher", "--lr", "-1", *SMALL]) == 2
    assert "lr must be > 0" in capsys.readouterr().err
    assert main(["train-teacher", "--batch-size", "100", "--limit", "50", "-q"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert main(["train-teacher", "--data", str(tmp_path / "nope"), "-q"]) == 2
    assert "no such image folder" in capsys.readouterr().err


def test_a_state_the_disk_refuses_is_one_error_line(tmp_path):
    """last.pt past what the OS lets a process write (RLIMIT_FSIZE: EFBIG; a full disk gives ENOSPC) ends the
    run with `far: error: <last.pt>: cannot write (...)`, not torch's 'unexpected pos' traceback, and leaves no
    temporary file."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))  # the teacher's state is ~1 MiB

    run = tmp_path / "r"
    p = far_cli("train-teacher", "--epochs", "0.5", "--batch-size", "16", *SMALL, "--out-dir", run,
                preexec_fn=limit)
    assert p.returncode == 2, p.stderr
    assert f"far: error: {run / 'last.pt'}: cannot write (File too large)" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and sorted(os.listdir(run)) == ["metrics.jsonl"]


@pytest.mark.parametrize("cmd", ["train-teacher", "distill", "prune", "finetune"])
def test_help(cmd, capsys):
    from far.cli import main

    assert main([cmd, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--resume" in text and "torchrun" in text and "--epochs" in text


def test_finetune_on_an_image_folder_with_new_classes(tmp_path, capsys):
    from PIL import Image

    from far.cli import main

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(3):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(12):
                img = (torch.rand(28, 28, generator=g) * 80 + 80 * c).to(torch.uint8).numpy()
                Image.fromarray(img, mode="L").save(d / f"{i}.png")
    torch.manual_seed(0)
    src = far.create_model("fmnist_deit_tiny", embed_dim=48, depth=1, num_heads=2)
    far.save(src, tmp_path / "src.safetensors")
    out = tmp_path / "ft.safetensors"
    code = main(["finetune", str(tmp_path / "src.safetensors"), "--data", str(tmp_path / "train"), "--val",
                 str(tmp_path / "val"), "--epochs", "2", "--batch-size", "12", "--lr", "1e-3", "-q",
                 "--out-dir", str(tmp_path / "run"), "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "new classifier" in text
    m = far.load(out)
    assert m.num_classes == 3 and m.pretrained_cfg["num_classes"] == 3
    assert len(list(far.far_modules(m))) == 1
    assert main(["finetune", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path / "train")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err


def test_evaluate_under_torchrun_raises_everywhere_and_gathers_logits(tmp_path):
    """Under torchrun each process evaluates a strided share: a label outside the classes in one share raised on
    that process alone, and the others went on into the next collective (a hang); keep_logits returned the
    process's own share."""
    script = tmp_path / "bad_label.py"
    script.write_text(
        "import torch, torch.distributed as dist, far\n"
        "dist.init_process_group('gloo')\n"
        "torch.manual_seed(0)\n"
        "m = far.create_model('fmnist_deit_tiny', far=False, embed_dim=32, depth=1, num_heads=2)\n"
        "y = torch.zeros(8, dtype=torch.int64); y[5] = 10  # image 5: process 1's share\n"
        "data = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), y)\n"
        "try:\n"
        "    far.evaluate(m, data, batch_size=4)\n"
        "    print(f'rank {dist.get_rank()}: no error', flush=True)\n"
        "except far.DataError as e:\n"
        "    print(f'rank {dist.get_rank()}: DataError {e}', flush=True)\n"
        "x = torch.randn(9, 1, 28, 28, generator=torch.Generator().manual_seed(1))\n"
        "res = far.evaluate(m, torch.utils.data.TensorDataset(x, torch.zeros(9, dtype=torch.int64)), batch_size=2,\n"
        "                   keep_logits=True)\n"
        "with torch.no_grad():\n"
        "    want = m.eval()(x)\n"
        "ok = res['num_images'] == 9 and torch.allclose(res['logits'], want, atol=1e-5)\n"
        "print(f'rank {dist.get_rank()}: logits in data order {ok}', flush=True)\n"
        "dist.destroy_process_group()\n")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    for rank in (0, 1):
        assert f"rank {rank}: DataError 1 label(s) outside the model's 10 classes [0, 9]" in run.stdout, run.stdout
        # keep_logits: every process's strided share, put back in data order (it returned this process's share)
        assert f"rank {rank}: logits in data order True" in run.stdout, run.stdout


def test_image_folder_training_repeats_and_resumes_to_the_same_result(tmp_path):
    # an image folder's training transforms (timm: random resized crop and flip) draw from python's and torch's
    # global RNGs when the DataLoader reads a batch, before the step reseeds torch: two runs with one seed differed
    # and a resumed run did not repeat the uninterrupted one; every item is now read under its own (step) seed
    from PIL import Image

    from far.data import make_dataset
    from far.models import data_config

    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            img = (torch.rand(36, 40, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(img, mode="L").save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", far=False, embed_dim=16, depth=1, num_heads=2, num_classes=2)
    data = make_dataset(tmp_path / "imgs", "train", data_config(model))

    def run(**kw):
        cfg = TrainConfig(**{**dict(epochs=2, batch_size=4, lr=1e-2, warmup_epochs=0, progress=False), **kw})
        return far.train_classifier(model, data, config=cfg).state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    whole = run()
    assert same(run(), whole)
    run(out_dir=str(tmp_path / "r"), max_steps=3)  # stopped mid-epoch (4 steps per epoch)
    assert same(run(out_dir=str(tmp_path / "r"), resume=True), whole)
    assert same(run(workers=1), whole)  # a worker process reads the same crops


def test_max_steps_message_says_a_resume_needs_a_larger_max_steps(tmp_path, capsys):
    # --max-steps counts a stage's steps from its start: the same command with --resume added stops again at once,
    # which the message ("resume with --resume --out-dir DIR") did not say
    from far.cli import main

    args = ["train-teacher", "--epochs", "1", "--batch-size", "16", "--limit", "48", "--eval-limit", "16", "-q",
            "--threads", "1", "--out-dir", str(tmp_path / "r"), "--max-steps", "1"]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0  # as the message said to: no step taken
    out = capsys.readouterr().out
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 1
    assert out.count("stopped after step 1") == 2 and "a larger --max-steps or none" in out
    assert main([*args[:-2], "--resume"]) == 0
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 3

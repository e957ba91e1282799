"""Resumed and refused runs of the methods, from the Python API: a run killed anywhere continues to the same end,
a resume under other settings is refused before it loads anything those settings did not make, and a new run
never overwrites an unfinished run's files. Also what the API applies from TrainConfig like the command line does
(limit, eval_limit) and the loss details that only show under rare settings."""
import collections
import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

import far
from conftest import HalvesImages
from far.errors import ConfigError
from far.train import TrainConfig
from far.train.loop import Dist, Task, train


Images = HalvesImages  # (image, label): which half is brighter


def teacher(depth=2, dim=32, heads=2, seed=0):
    torch.manual_seed(seed)
    return far.create_model("fmnist_deit_tiny", far=False, embed_dim=dim, depth=depth, num_heads=heads, num_classes=2)


def cfg(**kw):
    return TrainConfig(**{**dict(epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0.0, progress=False, augment=False),
                          **kw})


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


PRUNE = dict(prune_ratio=0.5, finetune_epochs=1, finetune_lr=1e-3, hoyer=1e-3)


def killed_at(monkeypatch, n: int):
    """Training steps of any stage raise KeyboardInterrupt at the n-th (a kill between two checkpoints)."""
    import far.train.loop as loop

    real, calls = loop._forward_backward, [0]

    def step(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt(f"killed at training step {n}")
        return real(*a, **k)

    monkeypatch.setattr(loop, "_forward_backward", step)
    return lambda: monkeypatch.setattr(loop, "_forward_backward", real)


@pytest.mark.parametrize("rounds,kill", [(1, 4), (2, 8)])
def test_prune_killed_after_masking_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, rounds, kill):
    # the masked model is compacted before its fine-tune, as far.load gives it back to a resumed run: before, its
    # state was saved at the full width and the resume was refused. Each round: 2 regularised steps, then 4
    # fine-tune steps; kill 4 is in round 1's fine-tune, kill 8 in round 2's regularised stage
    t, data = teacher(), Images(64)
    student = far.convert(copy.deepcopy(t))
    whole = far.prune(student, data, config=cfg(epochs=0.5), rounds=rounds, **PRUNE)
    revive = killed_at(monkeypatch, kill)
    with pytest.raises(KeyboardInterrupt):
        far.prune(student, data, config=cfg(epochs=0.5, out_dir=str(tmp_path), ckpt_every=1), rounds=rounds, **PRUNE)
    revive()
    done = far.prune(student, data, config=cfg(epochs=0.5, out_dir=str(tmp_path), ckpt_every=1, resume=True),
                     rounds=rounds, **PRUNE)
    assert done.far_run.completed
    for (_, a), (_, b) in zip(far.far_modules(done), far.far_modules(whole)):
        assert torch.equal(a.hidden_sizes, b.hidden_sizes)
    for (n, a), b in zip(done.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_prune_with_every_round_done_resumes_to_a_summary(tmp_path):
    t, data = teacher(), Images(64)
    student = far.convert(copy.deepcopy(t))
    first = far.prune(student, data, eval_data=Images(32, 2), config=cfg(epochs=0.5, out_dir=str(tmp_path)),
                      rounds=2, **PRUNE)
    again = far.prune(student, data, eval_data=Images(32, 2), config=cfg(epochs=0.5, out_dir=str(tmp_path),
                                                                         resume=True), rounds=2, **PRUNE)
    assert again.far_metadata["pruning"]["threshold"] == pytest.approx(first.far_metadata["pruning"]["threshold"])
    assert again.far_run.accuracy == pytest.approx(first.far_run.accuracy)
    assert dict(again.far_run.rows)["global threshold"] == dict(first.far_run.rows)["global threshold"]


def test_prune_resume_under_another_ratio_is_refused_before_loading_the_masked_model(tmp_path):
    t, data = teacher(), Images(64)
    student = far.convert(copy.deepcopy(t))
    far.prune(student, data, config=cfg(epochs=0.5, out_dir=str(tmp_path), max_steps=3), **PRUNE)
    with pytest.raises(ConfigError, match=r"masked\.safetensors was made by a different run; .*prune_ratio=0\.5 vs 0\.1"):
        far.prune(student, data, config=cfg(epochs=0.5, out_dir=str(tmp_path), resume=True), **{**PRUNE,
                                                                                                   "prune_ratio": 0.1})


def test_distill_resume_under_other_stage1_settings_is_refused(tmp_path):
    t, data = teacher(), Images(64)
    far.distill(t, data, config=cfg(epochs=0.5, lr=1e-2, out_dir=str(tmp_path), max_steps=3), stage2_epochs=0.5)
    with pytest.raises(ConfigError, match=r"stage1/model\.safetensors was made by a different run; "
                                          r".*stage1\.epochs=0\.5 vs 3(\.0)?, stage1\.lr=0\.01 vs 0\.5"):
        far.distill(t, data, config=cfg(epochs=3, lr=0.5, out_dir=str(tmp_path), resume=True), stage2_epochs=0.5)
    far.distill(t, data, config=cfg(epochs=0.5, lr=1e-2, out_dir=str(tmp_path), resume=True), stage2_epochs=0.5)


def test_distill_stage2_resume_checks_the_block_weight_stage2_uses(tmp_path):
    t, data = teacher(), Images(64)
    kw = dict(stage2_epochs=0.5, stage2_block_weight=1.0)
    far.distill(t, data, config=cfg(epochs=0.25, out_dir=str(tmp_path), max_steps=2), **kw)
    with pytest.raises(ConfigError, match=r"stage2/last\.pt belongs to a different run; .*block_weight=1\.0 vs 0\.0"):
        far.distill(t, data, config=cfg(epochs=0.25, out_dir=str(tmp_path), resume=True), **{**kw,
                                                                                                "stage2_block_weight": 0.0})
    # block_weight (stages 1 and joint) does not change stage 2: its resume goes on
    done = far.distill(t, data, config=cfg(epochs=0.25, out_dir=str(tmp_path), resume=True), block_weight=5.0, **kw)
    assert done.far_run.completed


@pytest.mark.parametrize("method", ["distill", "prune"])
def test_a_new_api_run_refuses_an_unfinished_run_before_its_first_stage(tmp_path, method):
    t, data = teacher(), Images(64)
    if method == "distill":  # 1 step, then 2
        run = lambda **k: far.distill(t, data, config=cfg(epochs=0.25, out_dir=str(tmp_path), **k), stage2_epochs=0.5)
        first, stop = tmp_path / "stage1" / "model.safetensors", 1
    else:  # 2 steps, then 4
        student = far.convert(copy.deepcopy(t))
        run = lambda **k: far.prune(student, data, config=cfg(epochs=0.5, out_dir=str(tmp_path), **k), **PRUNE)
        first, stop = tmp_path / "masked.safetensors", 3
    run(max_steps=stop)  # (per stage) the first stage done, the second stopped
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert first in before
    with pytest.raises(ConfigError, match=r"an unfinished run's state .*force=True in TrainConfig"):
        run()
    assert {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("method", ["distill", "prune", "reuse"])
def test_a_resume_with_nothing_to_resume_is_refused(tmp_path, method):
    # each stage resumes only if its own folder holds state: a --resume in a mistyped or empty out_dir trained the
    # whole run from scratch, as a new run, where a one-stage run (far train-teacher) refuses it
    t, data = teacher(depth=3), Images(64)
    out = tmp_path / "typo"
    c = cfg(epochs=0.25, out_dir=str(out), resume=True)
    run = {"distill": lambda: far.distill(t, data, config=c, stage2_epochs=0.25),
           "prune": lambda: far.prune(far.convert(copy.deepcopy(t)), data, config=c, **PRUNE),
           "reuse": lambda: far.reuse(t, data, config=c, plan={2: 1}, stage2_epochs=0.25)}[method]
    with pytest.raises(ConfigError, match="--resume: no run to resume in .*typo"):
        run()
    assert not out.exists()


def test_reuse_resumes(tmp_path):
    t, data = teacher(depth=3), Images(64)
    kw = dict(plan={2: 1}, stage2_epochs=0.5)
    part = far.reuse(t, data, config=cfg(epochs=0.25, out_dir=str(tmp_path), max_steps=1), **kw)  # 1 step, 1 of 2
    assert not part.far_run.completed
    with pytest.raises(ConfigError, match=r"belongs to a different run; .*ridge=0\.001 vs 0\.5"):
        far.reuse(t, data, config=cfg(epochs=0.25, out_dir=str(tmp_path), resume=True), ridge=0.5, **kw)
    done = far.reuse(t, data, config=cfg(epochs=0.25, out_dir=str(tmp_path), resume=True), **kw)
    assert done.far_run.completed  # the plan's int keys came back from JSON as strings and were "different"


def test_reuse_refuses_a_stage2_without_a_loss():
    with pytest.raises(ConfigError, match="stage 2 needs a loss"):
        far.reuse(teacher(depth=3), Images(32), plan={2: 1}, ce_weight=0.0, kd_weight=0.0, config=cfg())


def test_clean_block_loss_with_block_losses_only_trains_at_the_clean_weights():
    # no CE (labels=False) and no KD: no term at the noisy weights, so the joint stage runs without noise and
    # takes its block losses in its one pass (it raised a TypeError on a float loss of 0.0)
    t = teacher()
    out = far.distill(t, Images(32), config=cfg(epochs=0.5, weight_noise=0.05), stage1="joint", labels=False,
                      kd_weight=0.0, clean_block_loss=True, stage2_epochs=0)
    assert out.far_run.completed and out.far_run.history[-1].get("cos", 0) >= 0


def test_metrics_log_holds_each_step_once_after_a_resume(tmp_path):
    t, data = teacher(), Images(128)  # 8 steps per epoch

    class Killed(Task):
        calls = 0

        def loss(self, model, x, y):
            Killed.calls += 1
            if Killed.calls == 7:  # after the checkpoint at step 4, rows for steps 5 and 6 logged
                raise KeyboardInterrupt
            return super().loss(model, x, y)

    c = cfg(out_dir=str(tmp_path), ckpt_every=4, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        train(Killed(copy.deepcopy(t), c), data, None, c, Dist())
    c = cfg(out_dir=str(tmp_path), ckpt_every=4, log_every=1, resume=True)
    run = train(Task(copy.deepcopy(t), c), data, None, c, Dist())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == list(range(1, 9)) == [r["step"] for r in run.history if r["kind"] == "step"]
    assert [collections.Counter(steps)[s] for s in steps] == [1] * 8


def test_api_applies_limit_and_eval_limit():
    t = teacher()
    seen = []

    def count(model, data, **kw):
        seen.append(len(data))
        return 0.5

    import far.train.loop as loop

    real, loop.accuracy = loop.accuracy, count
    try:
        model = far.train_classifier(t, Images(64), eval_data=Images(40, 2), config=cfg(limit=16, eval_limit=8))
    finally:
        loop.accuracy = real
    assert model.far_run.steps == 1  # 16 of 64 images, batch 16, one epoch (it ran 4 steps)
    assert seen and set(seen) == {8}


def test_fashion_mnist_keeps_its_fast_path_under_a_limit():
    pytest.importorskip("far.data")
    from far.data import FashionMNIST, first

    try:
        ds = far.data.fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    part = first(ds, 10)
    assert isinstance(part, FashionMNIST) and len(part) == 10 and torch.equal(part.images, ds.images[:10])
    assert first(ds, None) is ds and first(ds, 10**6) is ds


def test_weight_decay_skips_far_biases_in_either_storage():
    from far.train.loop import _decays

    for storage in ("padded", "ragged"):
        m = far.set_storage(far.convert(teacher()), storage)
        decayed = {n for n, p in m.named_parameters() if _decays(n, p)}
        assert not {n for n in decayed if "bias" in n or n.endswith(("b_ih", "b_hh"))}, (storage, decayed)
        assert {n for n in decayed if "w_ih" in n} and {n for n in decayed if "head_proj" in n}, (storage, decayed)


@pytest.mark.parametrize("method", ["prune", "reuse"])
def test_mixup_targets_are_smoothed_once(method):
    # timm's mixup targets already hold the label smoothing; cross_entropy(label_smoothing=) smoothed them again
    from far.methods.prune import HoyerTask
    from far.methods.reuse import FinetuneTask

    t = teacher(depth=3)
    c = cfg(label_smoothing=0.1)
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    soft = torch.softmax(torch.randn(4, 2), dim=1)  # soft targets as mixup makes them (smoothing included)
    if method == "prune":
        model = far.convert(copy.deepcopy(t))
        task = HoyerTask(model, c, 0.0, "block", "far")
    else:
        model = far.reuse(t, Images(32), plan={2: 1}, config=cfg(epochs=0.25), stage2_epochs=0)
        task = FinetuneTask(model, t, c, 1.0, 0.0, 2.0)
    with torch.no_grad():
        out = task.loss(model, x, soft)
        want = -(soft * F.log_softmax(model(x), dim=1)).sum(1).mean()
    torch.testing.assert_close(out["ce"], want)


@pytest.mark.parametrize("stage1", ["isolated", "joint"])
def test_per_block_loss_terms_are_named_by_the_models_block_index(stage1):
    # a partial student (block 1 of 2 replaced) logged block 1's terms as cos_b0 / mse_b0
    out = far.distill(teacher(), Images(32), config=cfg(epochs=0.5, log_every=1), blocks=[1], stage1=stage1,
                      stage2_epochs=0)
    keys = {k for r in out.far_run.history if r["kind"] == "step" for k in r}
    assert {"cos_b1", "mse_b1"} <= keys and not {k for k in keys if k.endswith("_b0")}, keys


def _report(model):
    run = model.far_run
    stages = [r.get("stage") for r in run.history if r.get("kind") == "step"]
    return run.steps, model.far_metadata["training"]["steps"], sorted(set(stages)), len(stages)


@pytest.mark.parametrize("method,kill", [("distill", 4), ("prune", 4), ("prune-rounds", 8)])
def test_a_resumed_run_reports_the_stages_an_earlier_run_finished(tmp_path, monkeypatch, method, kill):
    """Steps, history (curves.png, summary.json) and the checkpoint's training record of a run killed in a later
    stage and resumed count every stage, also those it loaded from their finished files (distill: stage 1's model;
    prune: the masked model after the Hoyer stage; prune in rounds: round 1's result), as the uninterrupted run
    does. Distill: 2 stage-1 steps then 2 stage-2 steps; prune: 2 Hoyer steps, 4 fine-tune steps per round."""
    t, data = teacher(), Images(64)

    def run(**kw):
        c = cfg(epochs=0.5, log_every=1, **kw)
        if method == "distill":
            return far.distill(t, data, config=c, stage2_epochs=0.5)
        return far.prune(far.convert(copy.deepcopy(t)), data, config=c, rounds=2 if method == "prune-rounds" else 1,
                         **PRUNE)

    whole = run()
    revive = killed_at(monkeypatch, kill)
    with pytest.raises(KeyboardInterrupt):
        run(out_dir=str(tmp_path), ckpt_every=1)
    revive()
    done = run(out_dir=str(tmp_path), ckpt_every=1, resume=True)
    assert done.far_run.completed
    assert _report(done) == _report(whole)

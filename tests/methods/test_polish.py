"""The distill polish (far.methods.polish): its full-batch objective is block_loss on the whole cache, L-BFGS
lowers it without touching W_O or a pruned block's zero units, a NaN problem leaves the block as it was, the
blocks are split over processes and broadcast, and far.distill / `far distill` run it as a resumable stage."""
import dataclasses
import importlib

import pytest
import torch

import far
from conftest import RandomImages
from far.cli import main
from far.errors import ConfigError
from far.methods.distill import block_loss, make_student
from far.methods.polish import block_problem, check_polish, full_batch_loss, polish_block, polish_blocks
from far.nn import FARAttention, MixerTaps
from far.train import TrainConfig

TINY = dict(embed_dim=48, depth=2, num_heads=2)


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return far.create_model("fmnist_deit_tiny", far=False, **TINY).eval()


def block_and_problem(seed=0, m=24, n_tok=9, hidden=None, dtype=torch.float64):
    torch.manual_seed(seed)
    mix = FARAttention(12, num_heads=2, hidden_sizes=hidden, backend="torch").to(dtype)
    x = torch.randn(m, n_tok, 12, dtype=dtype)
    t = torch.randn(m, n_tok, 12, dtype=dtype)
    return mix, x, t


def grads(mix):
    return {n: p.grad.clone() for n, p in mix.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["cos", "mse", "cos+mse"])
def test_full_batch_loss_is_block_loss_on_the_whole_set_in_chunks(kind):
    """Chunks of 5 of 24 images (the last one short) give block_loss's value and gradient on all 24 at once:
    the relative MSE divides by the whole set's sum t^2, not each chunk's."""
    mix, x, t = block_and_problem()
    want_terms = block_loss(mix.token_mix(x), t, kind)
    sum(want_terms.values()).backward()
    want_terms = {k: v.detach() for k, v in want_terms.items()}
    want_grads = grads(mix)
    mix.zero_grad(set_to_none=True)
    got = full_batch_loss(mix, x, t, kind, chunk=5, backward=True)
    for k, v in want_terms.items():
        assert got[k] == pytest.approx(float(v), rel=1e-12)
    assert got["loss"] == pytest.approx(float(sum(want_terms.values())), rel=1e-12)
    got_grads = grads(mix)
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-10, atol=1e-14, msg=name)
    mix.zero_grad(set_to_none=True)
    assert full_batch_loss(mix, x, t, kind, chunk=7)["loss"] == pytest.approx(got["loss"], rel=1e-12)
    assert all(p.grad is None for p in mix.parameters())  # backward=False: no gradient
    with pytest.raises(ConfigError, match="block loss"):
        full_batch_loss(mix, x, t, "l1", chunk=5)


def test_polish_block_lowers_the_loss_and_keeps_wo_and_pruned_units():
    """L-BFGS lowers the full-batch loss; W_O (proj) is not trained; the units a pruned block keeps at zero stay
    exactly zero; the requires_grad flags are put back; the result reports what it did."""
    hidden = torch.tensor([[6, 3], [0, 5]])  # a pruned block, padded to 6: zero units in three (head, direction)s
    mix, x, t = block_and_problem(hidden=hidden)
    mix.pre_proj.weight.requires_grad_(False)  # whatever the flags say before, they come back
    proj = {n: p.detach().clone() for n, p in mix.proj.named_parameters()}
    zero = {n: p.detach() == 0 for n, p in mix.named_parameters()}
    assert sum(int(z.sum()) for z in zero.values()) > 100
    before = {n: p.detach().clone() for n, p in mix.named_parameters()}
    evals = []
    r = polish_block(mix, x, t, iters=15, kind="cos+mse", chunk=10, on_eval=evals.append)
    assert r["kept"] and r["evals"] == len(evals) >= 15 // 2
    assert r["loss"] < 0.95 * r["loss_start"]
    assert r["loss"] == pytest.approx(full_batch_loss(mix, x, t, "cos+mse", chunk=24)["loss"], rel=1e-12)
    for n, p in mix.proj.named_parameters():
        assert torch.equal(p, proj[n])
    for n, p in mix.named_parameters():
        assert torch.all(p.detach()[zero[n]] == 0), f"{n}: a zero unit moved"
        assert p.grad is None
    assert not torch.equal(mix.w_hh, before["w_hh"]) and not torch.equal(mix.pre_proj.weight, before["pre_proj.weight"])
    assert mix.pre_proj.weight.requires_grad is False and mix.w_ih.requires_grad is True


def test_polish_block_leaves_a_nan_problem_as_it_was():
    mix, x, t = block_and_problem(seed=1)
    t[3, 2, 1] = float("nan")
    before = {n: p.detach().clone() for n, p in mix.named_parameters()}
    r = polish_block(mix, x, t, iters=5)
    assert r["kept"] is False and r["evals"] == 0
    for n, p in mix.named_parameters():
        assert torch.equal(p, before[n])
    r = polish_block(*block_and_problem(seed=1), iters=0)  # 0 iterations: nothing to do
    assert r["evals"] == 0 and r["loss"] == r["loss_start"]


def test_block_problem_is_the_teachers_block_input_and_output_before_wo():
    teacher = tiny_teacher()
    data = RandomImages(10, seed=3)
    inputs, targets = block_problem(teacher, data, 1, images=7, batch_size=3, device="cpu")
    with torch.no_grad(), MixerTaps(teacher) as taps:
        teacher(data.x[:7])
        i, o = taps.take()
    assert inputs.shape == (7, 50, 48)
    torch.testing.assert_close(inputs, i[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets, o[1], rtol=1e-5, atol=1e-6)


def test_polish_blocks_splits_blocks_over_processes_and_broadcasts():
    """Process 1 of 2 polishes FAR block 1 (the second) only and reports block 0 without losses; every parameter
    of block j is broadcast from process j mod 2."""
    teacher = tiny_teacher()
    torch.manual_seed(0)
    student = make_student(teacher)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    sent = []
    rows = polish_blocks(student, teacher, RandomImages(12, seed=4), iters=3, images=12, batch_size=6, rank=1, world=2,
                         broadcast=lambda t, src: sent.append((t.data_ptr(), src)))
    assert [r["block"] for r in rows] == [0, 1]
    assert "loss" not in rows[0] and rows[1]["loss"] < rows[1]["loss_start"] and rows[1]["kept"]
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, start[n])}
    assert changed and all(n.startswith("blocks.1.attn.") and not n.startswith("blocks.1.attn.proj.")
                           for n in changed)
    want = [(p.data_ptr(), b) for b in (0, 1) for p in student.blocks[b].attn.parameters()]
    assert sent == want
    with pytest.raises(ConfigError, match="broadcast"):
        polish_blocks(student, teacher, RandomImages(4, seed=4), iters=1, world=2)
    with pytest.raises(ConfigError, match="FAR blocks"):
        polish_blocks(teacher, teacher, RandomImages(4, seed=4), iters=1)


@pytest.mark.parametrize("iters, images, msg", [(-1, 10, "polish iters"), (1.5, 10, "polish iters"),
                                                 (True, 10, "polish iters"), (1, 0, "polish images")])
def test_check_polish_refuses_bad_values(iters, images, msg):
    with pytest.raises(ConfigError, match=msg):
        check_polish(iters, images)


def test_distill_runs_the_polish_as_a_resumable_stage(tmp_path, monkeypatch):
    """far.distill with stage 1 and stage 2 skipped polishes the student it is given: each block's loss on the cached
    problem falls, the record keeps the settings, the stage's model file is what a resume loads (not a second
    polish), and a resume with other polish settings is refused."""
    teacher = tiny_teacher()
    torch.manual_seed(1)
    student = make_student(teacher)
    data = RandomImages(24, seed=6)
    cfg = TrainConfig(epochs=0, batch_size=8, eval_batch_size=8, progress=False, augment=False,
                      out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="nothing to train"):
        far.distill(teacher, data, student=student, config=cfg, stage2_epochs=0)
    with pytest.raises(ConfigError, match="polish iters"):
        far.distill(teacher, data, student=student, config=cfg, polish_iters=-2)
    got = far.distill(teacher, data, student=student, config=cfg, stage2_epochs=0, polish_iters=4, polish_images=16)
    rows = [r for r in got.far_run.history if r.get("kind") == "polish"]
    assert [r["block"] for r in rows] == [0, 1] and all(r["loss"] < r["loss_start"] for r in rows)
    for b in (0, 1):
        x, t = block_problem(teacher, data, b, 16, 8, "cpu")
        loss = lambda m: full_batch_loss(m.blocks[b].attn, x, t, "cos+mse", 8)["loss"]  # noqa: E731
        assert loss(got) == pytest.approx(rows[b]["loss"], rel=1e-5) and loss(got) < loss(student)
    meta = got.far_metadata["distill"]
    assert meta["polish_iters"] == 4 and meta["polish_images"] == 16
    line = dict(got.far_run.rows)["polish loss per block"]  # the report says what it did, block by block
    assert line == " ".join(f"{r['loss_start']:.4f}->{r['loss']:.4f}" for r in rows)
    assert (tmp_path / "run" / "polish" / "model.safetensors").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("polished again")

    # a resume loads the stage's file
    monkeypatch.setattr(importlib.import_module("far.methods.distill"), "polish_blocks", refuse)
    again = far.distill(teacher, data, student=student, config=dataclasses.replace(cfg, resume=True),
                        stage2_epochs=0, polish_iters=4, polish_images=16)
    assert [r for r in again.far_run.history if r.get("kind") == "polish"] == rows  # its record comes with it
    for (n, p), q in zip(got.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), n
    with pytest.raises(ConfigError, match="polish"):
        far.distill(teacher, data, student=student, config=dataclasses.replace(cfg, resume=True), stage2_epochs=0,
                    polish_iters=5, polish_images=16)


def test_cli_distill_polish(tmp_path):
    teacher = tiny_teacher()
    tpath, out = tmp_path / "t.safetensors", tmp_path / "o.safetensors"
    far.save(teacher, tpath)
    assert main(["distill", str(tpath), "--data", "fashion-mnist", "--epochs", "0", "--stage2-epochs", "0",
                 "--polish-iters", "2", "--polish-images", "8", "--batch-size", "8", "--limit", "16",
                 "--eval-limit", "8", "-q", "--out-dir", str(tmp_path / "run"), "-o", str(out)]) == 0
    meta = far.load(out).far_checkpoint["metadata"]["distill"]
    assert meta["polish_iters"] == 2 and meta["polish_images"] == 8
    assert main(["distill", str(tpath), "--data", "fashion-mnist", "--epochs", "0", "--polish-iters", "-1",
                 "-q", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    # in its place: stage 1, the polish, stage 2 (each its own folder; the polish starts from stage 1's model)
    out = tmp_path / "all.safetensors"
    assert main(["distill", str(tpath), "--data", "fashion-mnist", "--epochs", "0.5", "--polish-iters", "2",
                 "--polish-images", "8", "--stage2-epochs", "0.5", "--batch-size", "8", "--limit", "16",
                 "--eval-limit", "8", "-q", "--out-dir", str(tmp_path / "all"), "-o", str(out)]) == 0
    for stage in ("stage1", "polish"):
        assert (tmp_path / "all" / stage / "model.safetensors").is_file()
    ident = far.load(tmp_path / "all" / "polish" / "model.safetensors").far_checkpoint["metadata"]["run_identity"]
    assert any(k.startswith("stage1.") for k in ident) and ident["polish.polish_iters"] == 2
    assert (tmp_path / "all" / "stage2" / "metrics.jsonl").is_file() and out.is_file()


def test_polish_block_in_rounds_follows_one_run():
    """every=4 runs up to 12 iterations as rounds of one optimizer (its curvature pairs and evaluation budget
    kept), reporting after each: the same path as one run of 12, with one evaluation more per later round."""
    mix, x, t = block_and_problem(seed=2)
    one = polish_block(mix, x, t, iters=12)
    want = {n: p.detach().clone() for n, p in mix.named_parameters()}
    mix, x, t = block_and_problem(seed=2)
    rounds = []
    got = polish_block(mix, x, t, iters=12, every=4, on_round=lambda i, v: rounds.append((i, v)))
    assert 10 <= one["iters"] <= 12  # at most 12 iterations and 15 evaluations (torch's 1.25x): 11 here
    assert [i for i, _ in rounds] == [4, 8, one["iters"]] and got["iters"] == one["iters"]
    assert rounds[-1][1] == pytest.approx(got["loss"], rel=1e-12)
    assert got["evals"] == one["evals"] + 2  # each later round re-evaluates where the one before ended
    assert got["loss"] == pytest.approx(one["loss"], rel=1e-9)
    for n, p in mix.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-5, atol=1e-8, msg=n)


def test_polish_under_torchrun_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes: each polishes one of the 2 FAR blocks and broadcasts it; the checkpoint is
    the one process's (same cached problems, up to thread-count rounding)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    teacher = tiny_teacher()
    torch.manual_seed(5)
    tpath, spath = tmp_path / "t.safetensors", tmp_path / "s.safetensors"
    far.save(teacher, tpath)
    far.save(make_student(teacher), spath)
    common = ["distill", str(tpath), "--student", str(spath), "--data", "fashion-mnist", "--epochs", "0",
              "--stage2-epochs", "0", "--polish-iters", "3", "--polish-images", "16", "--limit", "32",
              "--eval-limit", "16", "--batch-size", "8", "-q", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for name, launch in (("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", "2", "-m", "far.cli"]),
                         ("one", [sys.executable, "-m", "far.cli"])):
        outs[name] = tmp_path / f"{name}.safetensors"
        run = subprocess.run([*launch, *common, "--out-dir", str(tmp_path / name), "-o", str(outs[name])],
                             capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
    two, one, start = (load_file(str(p)) for p in (outs["two"], outs["one"], spath))
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
    for b in (0, 1):  # both blocks polished (block 1 on the second process), W_O untouched
        assert not torch.equal(one[f"blocks.{b}.attn.lstm.w_hh"], start[f"blocks.{b}.attn.lstm.w_hh"])
        assert torch.equal(two[f"blocks.{b}.attn.proj.weight"], start[f"blocks.{b}.attn.proj.weight"])

"""Distillation: the taps capture the right tensors, the losses by hand, one step lowers the loss, stage 1
trains only the new modules, isolated stage 1 == each block trained alone on cached teacher activations,
label-free distillation, and the whole command end to end on a tiny model."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import far
from far.cli import main
from far.errors import ConfigError
from far.methods.distill import (DistillTask, block_loss, cosine_token_loss, kd_loss, make_student,
                                 relative_mse)
from far.nn import MixerTaps
from far.train import Task, TrainConfig, setup_distributed, train

TINY = dict(embed_dim=48, depth=2, num_heads=2)


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return far.create_model("fmnist_deit_tiny", far=False, **TINY).eval()


def attention_output_before_proj(attn, x):
    """timm Attention's output before W_O, recomputed from its own q/k/v weights (no hooks)."""
    B, N, C = x.shape
    H = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    return (a @ v).transpose(1, 2).reshape(B, N, C)


def test_hooks_capture_teacher_attention_before_wo_and_student_after_head_proj():
    teacher = tiny_teacher()
    student = make_student(teacher).eval()
    x = torch.randn(3, 1, 28, 28)
    th, sh = MixerTaps(teacher, inputs=False), MixerTaps(student, inputs=False)
    with torch.no_grad():
        teacher(x)
        student(x)
    t_vals, s_vals = th.take()[1], sh.take()[1]
    # recompute each block's input to the token mixer by running the blocks by hand
    with torch.no_grad():
        for model, vals, kind in ((teacher, t_vals, "teacher"), (student, s_vals, "student")):
            h = model._pos_embed(model.patch_embed(x))
            h = model.norm_pre(h)
            for blk, v in zip(model.blocks, vals):
                y = blk.norm1(h)
                if kind == "teacher":
                    want = attention_output_before_proj(blk.attn, y)
                else:  # FAR: everything but the final proj, i.e. the concatenated head_proj outputs
                    proj = blk.attn.proj
                    blk.attn.proj = torch.nn.Identity()
                    want = blk.attn(y)
                    blk.attn.proj = proj
                assert v.shape == want.shape
                torch.testing.assert_close(v, want, atol=1e-5, rtol=1e-5)
                h = blk(h)
    th.remove()
    sh.remove()


def test_cosine_token_loss_is_along_tokens_per_channel():
    s = torch.randn(2, 7, 5, dtype=torch.float64)
    t = torch.randn(2, 7, 5, dtype=torch.float64)
    want = 0.0
    for b in range(2):
        for c in range(5):
            want += 1 - float(s[b, :, c] @ t[b, :, c] / (s[b, :, c].norm() * t[b, :, c].norm()))
    assert abs(float(cosine_token_loss(s, t)) - want / 10) < 1e-6
    # invariant to a per-(batch, channel) positive scale of the student, not to token shuffles
    assert abs(float(cosine_token_loss(3.0 * s, s))) < 1e-6
    assert float(cosine_token_loss(s.flip(1), s)) > 1e-3


def test_stage1_trains_only_new_modules_and_one_step_lowers_the_loss():
    teacher = tiny_teacher()
    student = make_student(teacher)
    cfg = TrainConfig(label_smoothing=0.0)
    task = DistillTask(student, teacher, cfg, stage=1)
    names = {n for n, _ in task.trainable()}
    assert names and all(".attn." in n and ".proj." not in n for n in names)
    assert any(n.endswith("attn.w_hh") for n in names) and any("pre_proj" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if n not in names}
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    student.train()
    opt = torch.optim.SGD([p for _, p in task.trainable()], lr=0.05)
    before = task.loss(student, x, y)
    assert set(before) >= {"loss", "ce", "cos", "cos_b0", "cos_b1"}
    assert abs(float(before["cos"]) - float(before["cos_b0"] + before["cos_b1"])) < 1e-5
    opt.zero_grad()
    before["loss"].backward()
    opt.step()
    after = task.loss(student, x, y)
    assert float(after["loss"].detach()) < float(before["loss"].detach())
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_stage2_trains_everything():
    teacher = tiny_teacher()
    task = DistillTask(make_student(teacher), teacher, TrainConfig(), stage=2, block_weight=0.0)
    assert len(task.trainable()) == len(list(task.model.parameters()))


def test_bad_weights():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="loss weights"):
        DistillTask(make_student(teacher), teacher, TrainConfig(), stage=1, ce_weight=0.0, block_weight=0.0)
    with pytest.raises(ValueError, match="loss weights"):
        DistillTask(make_student(teacher), teacher, TrainConfig(), stage=2, kd_weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        DistillTask(make_student(teacher), teacher, TrainConfig(), stage=2, kd_weight=1.0, kd_temperature=0.0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_is_temperature_scaled_kl_from_teacher_to_student(temperature):
    torch.manual_seed(3)
    s, t = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, 10, dtype=torch.float64)
    p_t, p_s = (t / temperature).softmax(-1), (s / temperature).softmax(-1)
    want = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * temperature ** 2
    got = kd_loss(s, t, temperature)
    assert abs(float(got) - float(want)) < 1e-6 * max(1.0, float(want))
    assert float(kd_loss(t + 3.0, t, temperature)) < 1e-6  # same distribution (logits up to a constant): 0
    assert float(kd_loss(t, s, temperature)) != pytest.approx(float(got))  # KL is not symmetric: order matters


def test_stage2_with_kd_pulls_the_student_toward_the_teacher():
    teacher = tiny_teacher()
    student = make_student(teacher)
    task = DistillTask(student, teacher, TrainConfig(label_smoothing=0.0), stage=2, ce_weight=1.0, block_weight=0.0,
                       kd_weight=1.0, kd_temperature=2.0)
    torch.manual_seed(2)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    student.train()
    before = task.loss(student, x, y)
    assert set(before) == {"loss", "ce", "kd"}
    with torch.no_grad():
        want_kd = kd_loss(student(x), teacher(x), 2.0)
    assert abs(float(before["kd"]) - float(want_kd)) < 1e-5
    assert abs(float(before["loss"]) - float(before["ce"] + before["kd"])) < 1e-5
    opt = torch.optim.SGD([p for _, p in task.trainable()], lr=0.05)
    opt.zero_grad()
    before["loss"].backward()
    opt.step()
    assert float(task.loss(student, x, y)["loss"].detach()) < float(before["loss"].detach())


def test_clean_block_loss_moves_the_block_terms_to_the_clean_pass():
    """clean_blocks under weight noise: loss() keeps CE and KD only, clean_loss() is block_weight x exactly the
    block terms a plain task computes at the same weights; without noise (or block weight 0) nothing moves."""
    teacher = tiny_teacher()
    student = make_student(teacher).train()
    torch.manual_seed(3)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    noisy = TrainConfig(label_smoothing=0.0, weight_noise=0.05)
    task = DistillTask(student, teacher, noisy, stage=2, block_weight=2.5, kd_weight=1.0, kd_temperature=2.0,
                       kind="cos+mse", clean_blocks=True)
    plain = DistillTask(student, teacher, noisy, stage=2, block_weight=1.0, kd_weight=0.0, ce_weight=0.0,
                        kind="cos+mse")
    out = task.loss(student, x, y)
    assert set(out) == {"loss", "ce", "kd"}
    torch.testing.assert_close(out["loss"], out["ce"] + out["kd"])
    clean = task.clean_loss(student, x, y)
    want = plain.loss(student, x, y)
    assert {k for k in clean if k != "loss"} == {k for k in want if k != "loss"}  # cos_b0, mse_b0, ..., cos, mse
    torch.testing.assert_close(clean["loss"], 2.5 * want["loss"], rtol=1e-6, atol=0)
    for off in (TrainConfig(weight_noise=0.0), noisy):  # no noise: nothing to separate; block weight 0: no terms
        t = DistillTask(student, teacher, off, stage=2, block_weight=0.0 if off is noisy else 1.0, clean_blocks=True)
        assert t.clean_loss(student, x, y) is None
        assert (any(k.startswith("cos_b") for k in t.loss(student, x, y))) == (off is not noisy)
    for t in (task, plain):
        t.remove_hooks()


def test_clean_block_loss_runs_an_isolated_stage1_without_noise(tmp_path):
    """Stage 1 isolated has block losses only: with clean_block_loss it trains at the clean weights (no noise in
    its run identity), and stage 2 carries both the noise and the option."""
    teacher = tiny_teacher()
    cfg = TrainConfig(epochs=0.5, batch_size=32, progress=False, out_dir=str(tmp_path / "run"), weight_noise=0.05,
                      weight_noise_on="*weight,w_ih,w_hh")
    student = far.distill(teacher, _data(64)[0], config=cfg, stage2_epochs=0.5, clean_block_loss=True)
    assert student.far_metadata["distill"]["clean_block_loss"] is True

    def identity(stage):
        state = torch.load(tmp_path / "run" / stage / "last.pt", map_location="cpu", weights_only=False)
        return json.loads(state["identity"]["json"])

    one, two = identity("stage1"), identity("stage2")
    assert "weight_noise" not in one and one["clean_block_loss"] is True
    assert two["weight_noise"] == 0.05 and two["clean_block_loss"] is True


def test_clean_block_loss_needs_weight_noise(tmp_path):
    teacher = tiny_teacher()
    cfg = TrainConfig(epochs=0, batch_size=32, progress=False, out_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="clean block loss needs weight noise"):
        far.distill(teacher, _data(32)[0], config=cfg, stage2_epochs=1, clean_block_loss=True)
    assert not (tmp_path / "r").exists()


def test_distill_end_to_end(tmp_path, capsys):
    """`far distill` (a thin shell over far.distill): isolated stage 1 (cos + mse per block), stage 2 with
    KD and the block regularizer, the fidelity report in the checkpoint and in `far info`."""
    teacher = tiny_teacher()
    tpath = tmp_path / "teacher.safetensors"
    far.save(teacher, tpath)
    out = tmp_path / "student.safetensors"
    run = tmp_path / "run"
    assert main(["distill", str(tpath), "--data", "fashion-mnist", "--epochs", "1", "--batch-size", "32",
                 "--limit", "64", "--eval-limit", "64", "-q", "--out-dir", str(run), "--log-every", "1",
                 "--stage2-epochs", "0.5", "--kd-weight", "0.5", "--stage2-block-weight", "0.1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "block cosine isolated / in model" in text and "top-1 agreement" in text
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["output"] == str(out) and 0 <= summary["test_accuracy"] <= 1
    m = far.load(out)
    assert len(list(far.far_modules(m))) == 2
    meta = m.far_checkpoint["metadata"]
    assert meta["training"]["command"] == "distill" and meta["distill"]["stage1"] == "isolated"
    rows = (run / "stage1" / "metrics.jsonl").read_text().splitlines()
    assert any('"cos_b1"' in r and '"mse_b1"' in r for r in rows) and not any('"ce"' in r for r in rows)
    rows2 = (run / "stage2" / "metrics.jsonl").read_text().splitlines()
    assert any('"kd"' in r and '"cos_b0"' in r for r in rows2)
    assert meta["distill"]["kd_weight"] == 0.5 and len(meta["fidelity"]["blocks"]) == 2
    assert 0 <= meta["fidelity"]["agreement"] <= 1 and -1 <= meta["fidelity"]["blocks"][0]["isolated"]["cos"] <= 1
    assert (run / "curves.png").stat().st_size > 0
    assert main(["info", str(out)]) == 0
    assert "fidelity" in capsys.readouterr().out


def test_block_losses_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, N=2, C=2]
    t = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    # channel 0: s = (1, 0), t = (1, 1): cos = 1/sqrt(2); channel 1: s = (0, 2): cos = 1/sqrt(2)
    assert float(cosine_token_loss(s, t)) == pytest.approx(1 - 2 ** -0.5, abs=1e-6)
    # sum (s - t)^2 = 0 + 1 + 1 + 1 = 3; sum t^2 = 4
    assert float(relative_mse(s, t)) == pytest.approx(0.75, abs=1e-7)
    assert float(relative_mse(2 * t, t)) == pytest.approx(1.0) and float(relative_mse(t, t)) == 0.0
    both = block_loss(s, t, "cos+mse")
    assert set(both) == {"cos", "mse"} and set(block_loss(s, t, "mse")) == {"mse"}
    assert float(cosine_token_loss(3 * t, t)) == pytest.approx(0.0, abs=1e-6)  # cos: blind to scale
    assert float(relative_mse(3 * t, t)) == pytest.approx(4.0)                 # mse: sees it
    with pytest.raises(ConfigError, match="block loss"):
        block_loss(s, t, "l1")


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, n, seed, labels=True):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g) if labels else torch.full((n,), -1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class CachedBlockTask(Task):
    """One FAR block alone, on cached (teacher input, teacher output before W_O) pairs."""

    def __init__(self, block, cfg, kind):
        super().__init__(block, cfg)
        self.kind = kind
        for name, p in block.named_parameters():
            p.requires_grad_(not name.startswith("proj."))

    def loss(self, model, a, t):
        out = {f"{k}_b": v.detach() for k, v in block_loss(model.token_mix(a), t, self.kind).items()}
        out["loss"] = sum(block_loss(model.token_mix(a), t, self.kind).values())
        return out


def test_isolated_stage1_equals_each_block_trained_alone_on_cached_activations():
    """Isolated stage 1 trains all blocks in one run from the frozen teacher; each block must end exactly
    where training it alone on cached teacher activations (same batches, same schedule) ends."""
    teacher = tiny_teacher()
    data = ImageSet(32, seed=5)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_epochs=0.5, progress=False, augment=False,
                      grad_clip=0.5, seed=3)
    together = far.distill(teacher, data, config=cfg, stage2_epochs=0, block_loss="cos+mse")
    with torch.no_grad(), MixerTaps(teacher) as taps:
        teacher(data.x)
        inputs, targets = taps.take()
    torch.manual_seed(cfg.seed)  # the same initial student as far.distill's
    start = make_student(teacher)
    d = setup_distributed("cpu")
    for b, (a, t) in enumerate(zip(inputs, targets)):
        block = copy.deepcopy(start.blocks[b].attn)
        alone = train(CachedBlockTask(block, cfg, "cos+mse"), torch.utils.data.TensorDataset(a, t), None, cfg, d)
        want = dict(together.blocks[b].attn.named_parameters())
        for name, p in alone.model.named_parameters():
            torch.testing.assert_close(p, want[name], atol=2e-6, rtol=1e-5, msg=f"block {b} {name}")
        assert not torch.equal(want["w_hh"], start.blocks[b].attn.w_hh), "the block did train"


def test_label_free_distillation(tmp_path):
    """labels=False: no cross-entropy anywhere (labels are -1: CE would fail), stage 2 from the teacher's
    logits; and a plain folder of images (no class subfolders) loads as unlabeled data."""
    from PIL import Image

    from far.data import make_dataset
    from far.models import data_config

    teacher = tiny_teacher()
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, augment=False)
    student = far.distill(teacher, ImageSet(32, seed=1, labels=False), config=cfg, stage2_epochs=1, kd_weight=1.0,
                          labels=False, joint_epochs=0.5)
    keys = {k for r in student.far_run.history for k in r}
    assert "kd" in keys and "mse_b0" in keys and "ce" not in keys
    assert student.far_metadata["distill"]["labels"] is False
    with pytest.raises(ConfigError, match="stage 2 has no loss"):
        far.distill(teacher, ImageSet(8, seed=1, labels=False), config=cfg, labels=False, kd_weight=0.0,
                    stage2_block_weight=0.0)
    rng = torch.Generator().manual_seed(0)
    for i in range(5):
        sub = tmp_path / "photos" / ("a" if i % 2 else "") / f"{i}.png"
        sub.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(28, 28, generator=rng) * 255).to(torch.uint8).numpy(), mode="L").save(sub)
    ds = make_dataset(tmp_path / "photos", "train", data_config(teacher), labels=False)
    assert len(ds) == 5 and ds[0][1] == -1 and ds[0][0].shape == (1, 28, 28)


def _data(n=64):
    return far.data.fashion_mnist("train", limit=n), far.data.fashion_mnist("test", limit=n)


def test_distill_continues_an_existing_student_and_skips_stage1(tmp_path):
    """student= and epochs 0: stage 2 starts from that student's weights (not a fresh conversion) and
    stage 1 never runs; the CLI records where it started."""
    teacher = tiny_teacher()
    torch.manual_seed(123)
    student = make_student(teacher)
    for _, p in student.named_parameters():  # far from any fresh conversion of the teacher
        p.data.add_(0.1 * torch.randn_like(p))
    for _, m in far.far_modules(student):
        m.zero_padding_()
    start = copy.deepcopy(student.state_dict())
    cfg = TrainConfig(epochs=0, batch_size=32, progress=False, weight_decay=0.0, out_dir=str(tmp_path / "run"),
                      log_every=1, seed=0)
    train_set, test_set = _data()
    got = far.distill(teacher, train_set, student=student, eval_data=test_set, config=cfg, stage2_epochs=1,
                      stage2_lr=1e-9, stage1="joint").state_dict()
    for k, v in start.items():  # lr 1e-9: Adam moves each weight by at most ~steps * lr
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    fresh = make_student(teacher).state_dict()
    assert any((got[k] - fresh[k]).abs().max() > 1e-2 for k in fresh)
    assert not (tmp_path / "run" / "stage1").exists()
    # the same through the command line: the checkpoint names the student it continued
    tpath, spath, out = tmp_path / "t.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors"
    far.save(teacher, tpath)
    far.save(make_student(teacher), spath)
    assert main(["distill", str(tpath), "--student", str(spath), "--epochs", "0", "--stage2-epochs", "0.5",
                 "--batch-size", "32", "--limit", "64", "--eval-limit", "32", "-q", "--out-dir",
                 str(tmp_path / "run2"), "-o", str(out)]) == 0
    meta = far.load(out).far_checkpoint["metadata"]
    assert meta["student"] == str(spath.resolve()) and meta["distill"]["stage1_epochs"] == 0
    assert meta["distill"]["continued"] is True


def test_distill_refuses_bad_student_and_empty_runs(tmp_path):
    teacher = tiny_teacher()
    deeper = far.create_model("fmnist_deit_tiny", far=False, embed_dim=48, depth=3, num_heads=2)
    cfg = TrainConfig(epochs=0, batch_size=32, progress=False, out_dir=str(tmp_path / "r"))
    train_set, _ = _data(32)
    cases = [(dict(student=teacher), "no FAR modules"),  # an attention model is not a student
             (dict(student=make_student(deeper)), "3 blocks"),
             (dict(stage2_epochs=0), "nothing to train"),
             (dict(stage1="both"), "stage1 must be one of"),
             (dict(student=make_student(deeper), hidden_sizes=8), "hidden_sizes")]
    for kwargs, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            far.distill(teacher, train_set, config=cfg, **{"stage2_epochs": 1, **kwargs})
    with pytest.raises(ConfigError, match="already a FAR model"):
        far.distill(make_student(teacher), train_set, config=cfg, stage2_epochs=1)
    assert not (tmp_path / "r" / "stage2").exists()


def test_stage1_lr_defaults_by_mode(tmp_path):
    """Without a config (API) or --lr (CLI) an isolated stage 1 runs at STAGE1_LR["isolated"] and a joint
    one at STAGE1_LR["joint"]; an explicit LR wins; the joint phase has its own LR (--joint-lr)."""
    from far.methods.recipes import STAGE1_LR

    assert STAGE1_LR["isolated"] > STAGE1_LR["joint"]
    teacher = tiny_teacher()
    data = ImageSet(128, seed=1)
    for mode in ("isolated", "joint"):
        s = far.distill(teacher, data, stage1=mode, stage2_epochs=0)  # TrainConfig's 10 epochs of one batch
        assert s.far_metadata["distill"]["stage1_lr"] == STAGE1_LR[mode]
    tpath = tmp_path / "teacher.safetensors"
    far.save(teacher, tpath)
    base = ["distill", str(tpath), "--data", "fashion-mnist", "--epochs", "1", "--batch-size", "16", "--limit", "32",
            "--eval-limit", "16", "-q", "--stage2-epochs", "0", "--log-every", "1"]
    for extra, want in (([], STAGE1_LR["isolated"]), (["--stage1", "joint"], STAGE1_LR["joint"]),
                        (["--lr", "5e-3"], 5e-3), (["--stage1", "joint", "--lr", "5e-3"], 5e-3),
                        (["--recipe", "paper", "--epochs", "1", "--stage2-epochs", "0", "--batch-size", "16",
                          "--no-repeated-aug"], 5e-4 * 16 / 512)):
        out = tmp_path / f"s{len(extra)}_{want}.safetensors"
        assert main(base + extra + ["--out-dir", str(tmp_path / "run"), "--force", "-o", str(out)]) == 0
        lr = far.load(out).far_checkpoint["metadata"]["recipe"]["lr"]["stage1"]
        assert lr == pytest.approx(want), extra
    run = tmp_path / "joint"
    assert main(base + ["--joint-epochs", "2", "--joint-lr", "2e-3", "--out-dir", str(run), "-o",
                        str(tmp_path / "j.safetensors")]) == 0
    rows = [__import__("json").loads(r) for r in (run / "joint" / "metrics.jsonl").read_text().splitlines()]
    peak = max(r["lr"] for r in rows if "lr" in r)
    assert 1e-3 < peak <= 2e-3 + 1e-12
    with pytest.raises(ConfigError, match="joint lr"):
        far.distill(teacher, data, joint_epochs=1, joint_lr=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_teacher_trains_a_float32_student(dtype):
    """A bf16 / fp16 teacher (e.g. a checkpoint stored in bf16: far.load keeps its dtype) must not make a
    student trained in that dtype, whose optimizer steps below half an ulp of a weight are lost (at stage 2's
    LR 2e-4 about 40% of the weights of a tiny bf16 student never moved in 4 steps). The student trains in
    float32, on a float32 copy of the teacher: exactly the run of the teacher cast to float32 (bf16/fp16 values
    are float32 values); the teacher itself stays as it was."""
    data = ImageSet(32, seed=4)
    cfg = TrainConfig(epochs=0.5, batch_size=16, progress=False, augment=False)
    low = tiny_teacher().to(dtype)
    before = copy.deepcopy(low.state_dict())
    got = far.distill(low, data, eval_data=data, config=cfg, stage2_epochs=0.5)
    want = far.distill(copy.deepcopy(low).float(), data, eval_data=data, config=cfg, stage2_epochs=0.5)
    assert {p.dtype for p in got.parameters()} == {torch.float32}
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert all(p.dtype == dtype for p in low.parameters())
    assert all(torch.equal(v, low.state_dict()[k]) for k, v in before.items())
    assert got.far_metadata["fidelity"] == want.far_metadata["fidelity"]
    given = make_student(low)  # a low-precision student given to continue: trained in float32 too
    cont = far.distill(low, data, student=given, config=dataclasses.replace(cfg, epochs=0), stage2_epochs=0.5)
    assert {p.dtype for p in cont.parameters()} == {torch.float32} and given.blocks[0].attn.w_hh.dtype == dtype


def test_losses_keep_float64():
    """The losses upcast low precision to float32 but never round float64 inputs down to it: a float64 model
    (the loop trains one in its own dtype) gets float64 losses, equal to the by-hand formulas up to float64
    rounding (a float32 pass errs by ~1e-7 relative)."""
    g = torch.Generator().manual_seed(7)
    s, t = (torch.randn(3, 9, 5, dtype=torch.float64, generator=g) for _ in range(2))
    cos = (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))).mean()
    mse = (s - t).square().sum() / t.square().sum()
    a, b = s[:, 0], t[:, 0]  # [3, 5] logits
    kd = (b.softmax(-1) * (b.log_softmax(-1) - a.log_softmax(-1))).sum(-1).mean()
    eps = 64 * torch.finfo(torch.float64).eps
    for got, want in ((cosine_token_loss(s, t), cos), (relative_mse(s, t), mse), (kd_loss(a, b), kd)):
        assert got.dtype == torch.float64
        assert abs(float(got - want)) <= eps * max(1.0, abs(float(want)))
    assert cosine_token_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_resume_refuses_another_student_construction(tmp_path):
    """The settings that build a new student (hidden sizes, replaced blocks, pre_proj init) are part of a resumed
    run's identity: stage 1 finished with 4 units per head, a resume asking for 6 (or another pre_proj init, or
    other blocks) would otherwise load that stage's 4-unit model and finish it while the record says otherwise."""
    teacher = tiny_teacher()
    data = ImageSet(64, seed=2)
    cfg = TrainConfig(epochs=1, batch_size=16, progress=False, augment=False, out_dir=str(tmp_path / "run"),
                      max_steps=5)  # stage 1: 4 steps, done; stage 2: stopped at 5 of 8
    first = far.distill(teacher, data, config=cfg, stage2_epochs=2, hidden_sizes=4)
    assert not first.far_run.completed and (tmp_path / "run" / "stage1" / "model.safetensors").is_file()
    again = dataclasses.replace(cfg, max_steps=None, resume=True)
    for kwargs in (dict(hidden_sizes=6), dict(hidden_sizes=4, pre_proj_init="random"), dict(hidden_sizes=4, blocks=[1]),
                   dict()):
        with pytest.raises(ConfigError, match="new_student"):
            far.distill(teacher, data, config=again, stage2_epochs=2, **kwargs)
    done = far.distill(teacher, data, config=again, stage2_epochs=2, hidden_sizes=[4, 4])  # the same sizes, spelt out
    assert done.far_run.completed and all(m.hidden_sizes.max() == 4 for _, m in far.far_modules(done))


@pytest.mark.parametrize("kwargs, msg", [(dict(embed_dim=32, num_heads=2), "channels"),
                                         (dict(embed_dim=48, num_heads=2, patch_size=7), "tokens")],
                         ids=["width", "tokens"])
def test_distill_refuses_a_student_of_another_shape(tmp_path, kwargs, msg):
    """A student made from another architecture (other width or patch grid: e.g. the wrong --student file) is
    refused before any work with what differs, not by a shape error deep in the first training step."""
    teacher = tiny_teacher()
    other = far.create_model("fmnist_deit_tiny", far=False, depth=2, **kwargs)
    cfg = TrainConfig(epochs=0.5, batch_size=16, progress=False, out_dir=str(tmp_path / "r"))
    for mode in ("isolated", "joint"):
        with pytest.raises(ConfigError, match=msg):
            far.distill(teacher, ImageSet(32, seed=0), student=make_student(other), config=cfg, stage1=mode)
    assert not (tmp_path / "r" / "stage1").exists()


def test_isolated_loss_is_each_block_on_the_teachers_normed_block_input_by_hand():
    """IsolatedTask.loss, recomputed without taps (float64): block b's FAR module is fed norm1 of the teacher's
    residual stream at block b (not the student's stream, not the un-normed stream) and compared with the
    teacher's attention output before W_O; gradients reach only the FAR modules' own parameters (not W_O, not
    the teacher)."""
    from far.methods.distill import IsolatedTask

    teacher = tiny_teacher().double()
    student = make_student(teacher).double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    task = IsolatedTask(student, teacher, TrainConfig(), "cos+mse")
    out = task.loss(task.model, x, None)
    want = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        h = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(x)))
        ins, tgt = [], []
        for blk in teacher.blocks:
            ins.append(blk.norm1(h))
            tgt.append(attention_output_before_proj(blk.attn, ins[-1]))
            h = blk(h)
    for b, (a, t) in enumerate(zip(ins, tgt)):
        s = student.blocks[b].attn.token_mix(a)
        cos = (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))).mean()
        mse = (s - t).square().sum() / t.square().sum()
        for name, v in (("cos", cos), ("mse", mse)):  # float64 throughout: agreement to float64 rounding
            assert abs(float(out[f"{name}_b{b}"] - v)) <= 1e-12 * max(1.0, float(v)), (b, name)
        want = want + cos + mse
    assert abs(float(out["loss"].detach() - want)) <= 1e-12 * float(want)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert grads == {f"blocks.{b}.attn.{k}" for b in range(2) for k in ("pre_proj.weight", "pre_proj.bias", "w_ih",
                                                                        "w_hh", "b_ih", "b_hh", "head_proj_weight",
                                                                        "head_proj_bias")}
    task.remove_hooks()


@pytest.mark.parametrize("kwargs", [dict(joint_epochs=1.0), dict(stage1="joint")], ids=["joint-phase", "joint-stage1"])
def test_a_joint_stage_without_loss_is_refused_before_stage1(tmp_path, kwargs):
    """CE off (no labels), block weight 0 and kd weight 0 leave a joint stage nothing to train on: refused before
    any training, not after an isolated stage 1 has run (its time lost) when the joint phase is built."""
    teacher = tiny_teacher()
    cfg = TrainConfig(epochs=1, batch_size=16, progress=False, out_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="joint .*no loss"):
        far.distill(teacher, ImageSet(32, seed=0, labels=False), config=cfg, labels=False, block_weight=0.0,
                    kd_weight=0.0, stage2_epochs=0.5, **kwargs)
    assert not (tmp_path / "r").exists()


def test_resume_refuses_a_later_stage_started_from_other_earlier_stages(tmp_path):
    """Stage 2's state depends on the stages before it: a run with stage 1 skipped (epochs 0) stopped in stage 2,
    resumed with a stage 1, would train stage 1 and then load stage 2's state made without it, discarding stage 1
    while the record says it ran; such a resume is refused, the same one resumes."""
    teacher = tiny_teacher()
    data = ImageSet(64, seed=2)
    cfg = TrainConfig(epochs=0, batch_size=16, progress=False, augment=False, out_dir=str(tmp_path / "run"),
                      max_steps=3)
    assert not far.distill(teacher, data, config=cfg, stage2_epochs=1).far_run.completed
    again = dataclasses.replace(cfg, max_steps=None, resume=True)
    for kwargs in (dict(config=dataclasses.replace(again, epochs=1)), dict(config=again, joint_epochs=1)):
        with pytest.raises(ConfigError, match="before"):
            far.distill(teacher, data, stage2_epochs=1, **kwargs)
    assert far.distill(teacher, data, config=again, stage2_epochs=1).far_run.completed

"""Noise-aware training (--weight-noise): which weights it perturbs, the noise's statistics, exact
restoration, that the loop takes the gradient at the noisy weights and steps the clean ones, determinism
and resume, and the CLI options."""
import json
import math

import pytest
import torch
import torch.nn as nn

import far
from far.checkpoint import read_config
from far.data import fashion_mnist
from far.errors import ConfigError
from far.train import TrainConfig
from far.train.loop import Task, noise_patterns, noisy_weights, setup_distributed, train, weight_noise
from test_loop import far_cli  # the CLI runner of the loop's tests


class Toy(nn.Module):
    """A Linear (rows over inputs), a conv (rows over in x kh x kw), FAR-shaped 4-D storage and a bias."""

    def __init__(self, inputs=2048):
        super().__init__()
        self.fc = nn.Linear(inputs, 6, bias=True)
        self.conv = nn.Conv2d(8, 4, 16)
        self.attn = nn.Module()
        self.attn.w_ih = nn.Parameter(torch.randn(2, 2, 3, inputs))
        self.other = nn.Linear(inputs, 3, bias=False)
        with torch.no_grad():  # rows of very different full scales, so a wrong scale shows
            self.fc.weight.mul_(torch.logspace(-2, 1, 6)[:, None])
            self.attn.w_ih.mul_(torch.logspace(-1, 1, 3)[:, None])

    def forward(self, x):
        return self.fc(x)


def trained(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def test_patterns_select_trained_weight_matrices():
    m = Toy(64)
    names = lambda pats: [n for n, _, _ in noisy_weights(m, trained(m), noise_patterns(pats))]  # noqa: E731
    assert names("w_ih") == ["attn.w_ih"]
    assert names("fc.weight, conv.weight") == ["fc.weight", "conv.weight"]
    assert names("*.weight") == ["fc.weight", "conv.weight", "other.weight"]
    assert names("attn.*") == ["attn.w_ih"]
    dims = {n: d for n, _, d in noisy_weights(m, trained(m), ["*weight", "w_ih"])}
    assert dims == {"fc.weight": (-1,), "conv.weight": (1, 2, 3), "attn.w_ih": (-1,), "other.weight": (-1,)}
    m.other.weight.requires_grad_(False)  # frozen weights never get noise
    assert names("*.weight") == ["fc.weight", "conv.weight"]
    with pytest.raises(ConfigError, match="matches no trained weight matrix.*fc.weight"):
        noisy_weights(m, trained(m), ["w_hh"])
    assert names("fc.*") == ["fc.weight"]  # vectors (biases, norms) are skipped ...
    with pytest.raises(ConfigError, match="matches no trained weight matrix"):
        noisy_weights(m, trained(m), ["*.bias"])  # ... and matching only vectors is an error
    with pytest.raises(ConfigError, match="weight noise must be >= 0"):
        TrainConfig(weight_noise=-0.1).validate()
    with pytest.raises(ConfigError, match="at least one parameter pattern"):
        TrainConfig(weight_noise=0.1, weight_noise_on=" , ").validate()


@pytest.mark.parametrize("eta", [0.05, 0.5])
def test_noise_statistics_and_exact_restoration(eta):
    torch.manual_seed(int(eta * 100))
    m = Toy()
    clean = {n: p.detach().clone() for n, p in m.named_parameters()}
    weights = noisy_weights(m, trained(m), ["w_ih", "fc.weight", "conv.weight"])
    with weight_noise(weights, eta):
        for name, p, dims in weights:
            delta = (p.detach() - clean[name]).double()
            scale = eta * clean[name].abs().amax(dim=dims, keepdim=True).double()
            z = (delta / scale).flatten(len(p.shape) - len(dims))  # one row per output: N(0, 1) samples
            n = z.shape[-1]
            # per row: sample mean ~ N(0, 1/n), sample variance ~ 1 +- sqrt(2/n); 6 sigma bounds
            assert z.mean(-1).abs().max() < 6 / math.sqrt(n), name
            assert (z.var(-1) - 1).abs().max() < 6 * math.sqrt(2 / n), name
        for name in ("fc.bias", "conv.bias", "other.weight"):  # not selected: untouched
            assert torch.equal(dict(m.named_parameters())[name], clean[name])
    for name, p in m.named_parameters():  # restored bit for bit
        assert torch.equal(p, clean[name]), name


def test_restored_on_error_and_off_at_zero():
    m = Toy(64)
    clean = m.fc.weight.detach().clone()
    weights = noisy_weights(m, trained(m), ["fc.weight"])
    with pytest.raises(RuntimeError, match="boom"):
        with weight_noise(weights, 0.3):
            assert not torch.equal(m.fc.weight, clean)
            raise RuntimeError("boom")
    assert torch.equal(m.fc.weight, clean)
    state = torch.random.get_rng_state()
    with weight_noise(weights, 0.0):
        assert torch.equal(m.fc.weight, clean)
    assert torch.equal(torch.random.get_rng_state(), state)  # off: no random draw either


class Seen(Task):
    """loss = ||fc.weight||^2 / 2 + ||other.weight||^2 / 2 (gradient = the weights the forward saw);
    records the weights each forward saw and the clean weights after each step."""

    name = "seen"

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.seen, self.after = [], []

    def loss(self, model, x, y):
        self.seen.append({k: getattr(model, k).weight.detach().clone() for k in ("fc", "other")})
        loss = 0.5 * (model.fc.weight ** 2).sum() + 0.5 * (model.other.weight ** 2).sum() + 0 * x.sum()
        return {"loss": loss}

    def after_step(self, model):
        self.after.append({k: getattr(model, k).weight.detach().clone() for k in ("fc", "other")})


def seen_setup(eta, limit=24, **cfg):
    """Two bias-free Linears (noise on fc only) and a one-epoch AdamW run at a constant LR 1e-2."""
    torch.manual_seed(1)
    model = nn.Module()
    model.fc, model.other = nn.Linear(784, 5, bias=False), nn.Linear(784, 5, bias=False)
    model.forward = lambda x: model.fc(x.flatten(1))
    return model, TrainConfig(epochs=1, batch_size=8, limit=limit, lr=1e-2, min_lr=1e-2, warmup_epochs=0,
                              weight_decay=0, grad_clip=0, progress=False, augment=False, weight_noise=eta,
                              weight_noise_on="fc.weight", **cfg)


def run_seen(eta, out_dir=None, max_steps=None, resume=False, seed=0):
    model, cfg = seen_setup(eta, out_dir=out_dir, max_steps=max_steps, resume=resume, ckpt_every=1, seed=seed)
    task = Seen(model, cfg)
    start = {k: getattr(model, k).weight.detach().clone() for k in ("fc", "other")}
    train(task, fashion_mnist("train", limit=24), None, cfg, setup_distributed("cpu"))
    return task, start, model


def test_loop_takes_the_gradient_at_the_noisy_weights_and_steps_the_clean_ones():
    task, start, _ = run_seen(eta=1.0)
    assert len(task.seen) == 3
    before = start
    for seen, after in zip(task.seen, task.after):
        assert not torch.equal(seen["fc"], before["fc"])  # the forward saw noise on fc ...
        assert torch.equal(seen["other"], before["other"])  # ... and none on the unselected weight
        # AdamW's first step is lr * g / (|g| + eps) per element, g = the weights the forward saw: after it,
        # clean - lr * g / (|g| + eps) (a noisy weight left in place would start from the noisy one)
        if after is task.after[0]:
            g = seen["fc"].double()
            want = before["fc"].double() - 1e-2 * g / (g.abs() + 1e-8)
            torch.testing.assert_close(after["fc"].double(), want, atol=1e-7, rtol=0)
            flips = (torch.sign(seen["fc"]) != torch.sign(before["fc"])).float().mean()
            assert flips > 0.2  # eta = 1 flips many signs: the gradient at the clean weights would differ
        before = after


class SeenClean(Seen):
    """Seen, plus a clean pass: clean_loss = 3 x ||fc.weight||^2 / 2, recording the weights it saw."""

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.clean_seen = []

    def clean_loss(self, model, x, y):
        self.clean_seen.append(model.fc.weight.detach().clone())
        return {"loss": 1.5 * (model.fc.weight ** 2).sum(), "anchor": (model.fc.weight ** 2).sum().detach()}


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_clean_pass_sees_the_clean_weights_and_its_gradient_adds_up(eta):
    model, cfg = seen_setup(eta, limit=8, log_every=1)
    task = SeenClean(model, cfg)
    start = model.fc.weight.detach().clone()
    report = train(task, fashion_mnist("train", limit=8), None, cfg, setup_distributed("cpu"))
    if eta == 0:  # no noise: every weight is clean, so there is no second pass
        assert task.clean_seen == []
        return
    [noisy], [clean], [after] = [s["fc"] for s in task.seen], task.clean_seen, [a["fc"] for a in task.after]
    assert torch.equal(clean, start) and not torch.equal(noisy, start)
    g = noisy.double() + 3 * start.double()  # the noisy pass's gradient plus the clean pass's
    want = start.double() - 1e-2 * g / (g.abs() + 1e-8)  # AdamW's first step
    torch.testing.assert_close(after.double(), want, atol=1e-7, rtol=0)
    step = next(r for r in report.history if r["kind"] == "step")
    assert "anchor" in step  # the clean pass's terms are logged beside the noisy pass's


def test_noise_is_deterministic_resumable_and_changes_training(tmp_path):
    a, _, ma = run_seen(0.5)
    b, _, mb = run_seen(0.5)
    assert all(torch.equal(x["fc"], y["fc"]) for x, y in zip(a.seen, b.seen))
    assert torch.equal(ma.fc.weight, mb.fc.weight)
    c, _, mc = run_seen(0.5, seed=1)  # another seed: other noise
    assert not torch.equal(c.seen[0]["fc"], a.seen[0]["fc"])
    part, _, _ = run_seen(0.5, out_dir=str(tmp_path / "r"), max_steps=2)
    rest, _, mr = run_seen(0.5, out_dir=str(tmp_path / "r"), resume=True)
    assert len(part.seen) == 2 and len(rest.seen) == 1
    assert torch.equal(rest.seen[0]["fc"], a.seen[2]["fc"]) and torch.equal(mr.fc.weight, ma.fc.weight)
    with pytest.raises(ConfigError, match="weight_noise"):  # a resume must keep the noise
        run_seen(0.2, out_dir=str(tmp_path / "r"), resume=True)


def test_cli_distill_with_weight_noise(tmp_path):
    out = tmp_path / "nr.safetensors"
    common = ["--limit", "32", "--eval-limit", "50", "-q", "--threads", "1", "--batch-size", "16"]
    r = far_cli("distill", "fmnist_deit_tiny", "--student", "fmnist_far_tiny", "--epochs", "0", "--stage2-epochs", "1",
                "--weight-noise", "0.08", "--weight-noise-on", "w_ih,head_proj_weight", "--out-dir", tmp_path / "run",
                "-o", out, *common)
    assert r.returncode == 0, r.stderr
    model = far.load(out)
    base = far.create_model("fmnist_far_tiny", pretrained=True)
    config = read_config(out)["metadata"]["training"]["config"]
    assert (config["weight_noise"], config["weight_noise_on"]) == (0.08, "w_ih,head_proj_weight")
    changed = [n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert any("w_ih" in n for n in changed)
    assert read_config(out)["metadata"]["distill"]["clean_block_loss"] is False
    r = far_cli("distill", "fmnist_deit_tiny", "--student", "fmnist_far_tiny", "--epochs", "0", "--stage2-epochs", "1",
                "--weight-noise", "0.08", "--clean-block-loss", "--out-dir", tmp_path / "clean",
                "-o", tmp_path / "clean.safetensors", *common)
    assert r.returncode == 0, r.stderr
    assert read_config(tmp_path / "clean.safetensors")["metadata"]["distill"]["clean_block_loss"] is True
    steps = [json.loads(line) for line in (tmp_path / "clean" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert any("cos_b0" in r and "kd" in r for r in steps if r["kind"] == "step")  # both passes logged
    r = far_cli("distill", "fmnist_deit_tiny", "--student", "fmnist_far_tiny", "--epochs", "0", "--weight-noise", "0.08",
                "--weight-noise-on", "w_xx", "--out-dir", tmp_path / "bad", "-o", tmp_path / "bad.safetensors", *common)
    assert r.returncode != 0 and "w_xx" in r.stderr and "matches no trained weight" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad.safetensors").exists()

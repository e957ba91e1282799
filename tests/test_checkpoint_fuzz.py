"""Fuzzing far.load with mutations of a real checkpoint (fixed seed): every mutated file either fails with
a CheckpointError or loads a model equal to the original (same tensors, dtypes, hidden sizes); never
another exception, a crash, a hang or a huge allocation."""
import json
import random
import struct
import time

import pytest
import torch

import far
from far import CheckpointError

CASES = 400
SEED = 20261206
HOSTILE = [None, True, False, 0, 1, -1, 2, 3, 7, 64, 65, 2**31, 2**63, -2**63, 10**30, 0.5, -0.0, 1e308, 1e-308,
           "", "x", "F32", "F16", "I64", "BF16", "F8_E4M3", "fmnist_deit_tiny", "vit_huge_patch14_224",
           "blocks.0.attn", "far-checkpoint", "0" * 64, [], [0], [0, 0], [1, 2, 3], [[[[]]]], [-1, 5], [2**40, 1],
           {}, {"a": 1}, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}]


def _model():
    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", depth=2, embed_dim=8, num_heads=2,
                             hidden_sizes=[[[3, 1], [0, 4]], [[4, 4], [2, 0]]])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for _, m in far.far_modules(model):
            m.zero_padding_()
    return model


def _state(model):
    return ({k: v for k, v in model.state_dict().items()},
            [(n, m.hidden_sizes.tolist()) for n, m in far.far_modules(model)])


def _same(a, b) -> bool:
    (ta, ha), (tb, hb) = a, b
    return ha == hb and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta)


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, pad=True) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _random_path(rng, obj):
    """A random (container, key) inside nested dicts/lists (the container may be obj itself)."""
    parent, key = None, None
    node = obj
    while isinstance(node, (dict, list)) and node and (parent is None or rng.random() < 0.7):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        parent, node = node, node[key]
    return parent, key


def _mutate_json(rng, obj):
    parent, key = _random_path(rng, obj)
    if parent is None:
        return rng.choice(HOSTILE)
    r = rng.random()
    if r < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif r < 0.25 and isinstance(parent, list):
        parent.append(rng.choice(HOSTILE))
    elif r < 0.35 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] += rng.choice([-1, 1, 8, -8, 2**32])
    else:
        parent[key] = rng.choice(HOSTILE)
    return obj


def mutate(rng, data: bytes) -> bytes:
    kind = rng.randrange(7)
    header, body = _split(data)
    n = 8 + struct.unpack("<Q", data[:8])[0]
    if kind == 0:  # flip bytes anywhere
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:  # flip or replace bytes in the header text
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8, n)] = rng.choice(b'{}[]",:0123456789 -.eE\\tfnux') if rng.random() < 0.5 else \
                rng.randrange(256)
        return bytes(b)
    if kind == 2:  # truncate or extend
        cut = rng.randrange(len(data) + 1)
        return data[:cut] if rng.random() < 0.6 else data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == 3:  # the header length field
        value = rng.choice([0, 1, 7, n - 9, n - 7, n + 1, len(data), 2**32, 2**63, 2**64 - 1, rng.randrange(2**64)])
        return struct.pack("<Q", value) + data[8:]
    if kind == 4:  # a field of a tensor entry or of the header (structure kept: the digest still guards data)
        return _join(_mutate_json(rng, header), body)
    # kind 5, 6: a field of far_config, the digest kept (5) or dropped (6, what a hand edit does)
    config = json.loads(header["__metadata__"]["far_config"])
    if kind == 6:
        config.pop("sha256", None)
    config = _mutate_json(rng, config)
    header["__metadata__"]["far_config"] = json.dumps(config)
    return _join(header, body, pad=rng.random() < 0.5)


def test_mutated_checkpoints_fail_cleanly_or_load_unchanged(tmp_path):
    torch.set_num_threads(1)
    src = tmp_path / "m.safetensors"
    far.save(_model(), src)
    original = _state(far.load(src))
    data = src.read_bytes()
    rng = random.Random(SEED)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"error": 0, "same": 0}
    t0 = time.perf_counter()
    for case in range(CASES):
        mutated = mutate(rng, data)
        path.write_bytes(mutated)
        try:
            model = far.load(path)
        except CheckpointError as e:
            assert str(path) in str(e) and "\n" not in str(e), (case, str(e))
            outcomes["error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the assertion reports it
            pytest.fail(f"case {case}: {type(e).__name__}: {e} (not a CheckpointError)")
        assert _same(_state(model), original), f"case {case}: loaded a model that differs from the original"
        outcomes["same"] += 1
    seconds = time.perf_counter() - t0
    assert outcomes["error"] > CASES // 2 and outcomes["same"] > 0, outcomes  # both sides were exercised
    assert seconds < 60, f"{CASES} cases took {seconds:.0f} s"

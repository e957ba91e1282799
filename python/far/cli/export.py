"""far export (ONNX for IMC toolchains), far import-public (the authors' public checkpoints)."""
from __future__ import annotations

import argparse
from pathlib import Path

from far.cli.options import (Formatter, add_common, add_model, add_output, add_threads, at_least, note, output_checks,
                              set_threads)
from far.errors import ConfigError


def _check_with_onnxruntime(model, path: str, batch: int) -> tuple[float, float]:
    """(max |onnxruntime - torch| on a random batch, max |torch|)."""
    import torch

    try:
        import onnxruntime as ort
    except ImportError as e:
        from far.interop import INSTALL_HINT

        raise ConfigError(f"--check needs the optional package onnxruntime ({e}); install it: {INSTALL_HINT}") from e
    pe = model.patch_embed
    try:
        x = torch.randn(batch, pe.proj.in_channels, *pe.img_size, generator=torch.Generator().manual_seed(0))
    except RuntimeError as e:  # the allocator refused (or the size overflowed): a batch this machine cannot hold
        raise ConfigError(f"--check runs one batch of --batch-size {batch} images, which does not fit in memory "
                          f"({' '.join(str(e).split())}); lower --batch-size or drop --check") from None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = torch.from_numpy(sess.run(None, {"pixels": x.numpy()})[0])
    with torch.no_grad():
        ref = model.float()(x)
    return float((y.double() - ref.double()).abs().max()), float(ref.abs().max())


def cmd_export(args: argparse.Namespace) -> int:
    from far.interop import export_onnx, require_onnx
    from far.models import load_model, resolve

    require_onnx()  # before any work: say how to install it
    set_threads(args)
    if args.batch_size is not None:
        at_least(args, 1, "batch_size")
    ref = resolve(args.model)
    output_checks(args, [ref.path] if ref.path else [], "output", output_kind="an ONNX graph")
    model, _ = load_model(ref, far=True)
    model = model.float().eval()
    proto = export_onnx(model, args.output, batch_size=args.batch_size, force=args.force)
    if not args.quiet:
        lstm = sum(n.op_type == "LSTM" for n in proto.graph.node)
        size = Path(args.output).stat().st_size / 2**20
        data = Path(str(args.output) + ".data")  # weights above protobuf's 2 GiB limit are written beside the graph
        beside = f" + {data.stat().st_size / 2**20:.2f} MiB of weights in {data}" if any(
            t.data_location == t.EXTERNAL for t in proto.graph.initializer) else ""
        print(f"wrote {args.output} ({size:.2f} MiB{beside}, opset {proto.opset_import[0].version}, "
              f"{len(proto.graph.node)} nodes, {lstm} LSTM ops, batch {args.batch_size or 'dynamic'})")
    if args.check:
        err, scale = _check_with_onnxruntime(model, args.output, args.batch_size or 2)
        print(f"check: onnxruntime vs torch, max |difference| {err:.3g} (outputs up to {scale:.3g})")
    return 0


def cmd_import_public(args: argparse.Namespace) -> int:
    from far.interop import import_public
    from far.models import save

    output_checks(args, [args.model], "output")
    set_threads(args)
    if args.num_heads is not None:
        at_least(args, 1, "num_heads")
    model = import_public(args.model, num_heads=args.num_heads, pruned=args.pruned,
                          allow_pickle=args.allow_pickle, arch=args.arch)
    if not args.quiet:
        print(model.far_public_import.table())
    save(model.float(), args.output, force=args.force)
    note(args, f"wrote {args.output}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export", formatter_class=Formatter, help="write a FAR model as ONNX (one LSTM op per head and direction)",
        description="Write MODEL (a FAR checkpoint or zoo name, pruned or not; a timm name is converted with random "
                    "LSTMs) as an ONNX graph (opset 17) for IMC toolchains: every (head, direction) of every FAR "
                    "block is an ONNX LSTM op (gates permuted to ONNX's i, o, f, c order; one bidirectional op "
                    "where a head keeps as many forward as backward units, else one forward and one reverse "
                    "op; none for a direction with 0 units), pre_proj / head_proj / proj and the rest of the ViT "
                    "(patch embedding, LayerNorms, MLPs, head) as standard ops. Input 'pixels' [B, C, H, W], "
                    "output 'logits' [B, classes]. Needs the optional packages: pip install onnx onnxruntime.",
        epilog="examples:\n"
               "  far export fmnist_far_tiny_pruned -o far_tiny_pruned.onnx --check\n"
               "  far export model.safetensors -o model.onnx --batch-size 1")
    add_model(p, help="a FAR checkpoint file or zoo name (or an attention model: its attention blocks export too)")
    add_output(p, required=True, help="the .onnx file to write")
    p.add_argument("--batch-size", type=int, metavar="B", help="a fixed batch size (default: dynamic)")
    p.add_argument("--check", action="store_true",
                   help="run the written file with onnxruntime on a random batch and print its max difference to "
                        "PyTorch")
    add_threads(p)  # on the CPU: ONNX export traces the model there
    add_common(p, quiet="print nothing but the --check line")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import-public", formatter_class=Formatter,
        help="convert a checkpoint of the authors' public FAR code to a far checkpoint",
        description="Read a checkpoint of the FAR authors' public code (github.com/aliothren/FAR: a timm ViT whose "
                    "blocks hold MultiHeadLstm, one block-diagonal bidirectional torch LSTM, or ParallelLSTM, one "
                    "LSTM per head) and write it as a far checkpoint with FARAttention blocks computing the same "
                    "function. Their pruned units (zero LSTM weights, live biases) are dropped only where that "
                    "changes nothing (--pruned exact), or all of them (--pruned mask: hidden sizes from the "
                    "pruning pattern; the printed table bounds each attention module's output change for the same "
                    "input; the MLP after it is not covered).",
        epilog="examples:\n"
               "  far import-public checkpoint.pth -o far_deit_tiny.safetensors\n"
               "  far import-public pruned_model.pth --allow-pickle --pruned mask -o pruned.safetensors")
    add_model(p, help="their checkpoint file (.pth: a state_dict, {'model': ...}, or a pickled model)")
    add_output(p, required=True)
    p.add_argument("--num-heads", type=int, metavar="H", help="heads per block (default: from the block-diagonal weights)")
    p.add_argument("--pruned", choices=("exact", "mask"), default="exact",
                   help="which pruned units to drop: those whose removal changes nothing, or every masked unit")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle whole saved models (torch.save(model)); runs pickle: only for files you trust")
    p.add_argument("--arch", default="deit_base_patch16_224", metavar="TIMM_NAME",
                   help="the timm name recorded for rebuilding (its kwargs come from the checkpoint's shapes)")
    add_threads(p)  # on the CPU: the conversion and its bound on each attention module's change
    add_common(p, quiet="print nothing on success")
    p.set_defaults(func=cmd_import_public)

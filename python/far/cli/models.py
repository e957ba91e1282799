"""far info, far convert."""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from far.cli.options import (HIDDEN_SIZE_HELP, Formatter, add_common, add_model, add_output, add_teacher_args,
                             at_least, describe_hidden_size, output_checks, parse_hidden_size, warn)
from far.errors import ConfigError


# ---------------------------------------------------------------- info
def _version(module: str) -> str:
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return f"not installed ({type(e).__name__})" if isinstance(e, ImportError) else f"broken ({e})"
    return getattr(mod, "__version__", "unknown")


def _backend_lines(device: str) -> list:
    """Every backend of the FAR block's op (far_kernels.bilstm_fused_scan) on `device`: available or why not."""
    import far_kernels
    from far_kernels.ops.bilstm_fused_scan import OP

    lines = []
    for name, why in far_kernels.backend_report(device).items():
        if why is None:
            op_why = OP.reason(name, device)
            status = "available" if op_why is None else f"available, but the FAR block: {op_why}"
        else:
            status = f"unavailable: {why}"
        lines.append(f"  {name:<7} {status}")
    lines.append(f"  auto -> {far_kernels.dispatch.select(OP, 'auto', device)}")
    env = os.environ.get("FAR_BACKEND")
    if env:
        try:
            default = far_kernels.dispatch.select(OP, None, device)
        except Exception as e:  # noqa: BLE001 - report, do not fail `far info`
            default = f"error: {e}"
        lines.append(f"  default (env FAR_BACKEND={env}) -> {default}")
    return lines


def _param_line(path, blocks) -> str:
    """Parameters kept (what the file stores: a pruned FAR block's kept units) and stored in memory once
    loaded (a FAR block's tensors padded to its widest head and direction), whole model and token mixers,
    from the header's tensor shapes."""
    import math
    import re

    from safetensors import safe_open

    kept = mixer = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            n = math.prod(f.get_slice(key).get_shape())
            kept += n
            mixer += n if re.match(r"blocks\.\d+\.attn\.", key) else 0
    padding = 0
    for b in blocks:
        H, d, hs = b["num_heads"], b["head_dim"], b["hidden_sizes"]
        n = max((k for row in hs for k in row), default=0)
        ks = [k for row in hs for k in row]
        padded = 2 * H * (4 * n * d + 4 * n * n + 8 * n) + H * d * 2 * n
        padding += padded - sum(4 * k * d + 4 * k * k + 8 * k + d * k for k in ks)
    if not padding:
        return f"parameters   {kept:,} ({mixer:,} in the token mixers)"
    return (f"parameters   {kept:,} kept ({mixer:,} in the token mixers); {kept + padding:,} stored in memory "
            f"({mixer + padding:,}: FAR tensors padded to each block's widest head and direction)")


def checkpoint_summary(path) -> list:
    """Lines describing a checkpoint's config (validated), its checksum verified over the tensors (CheckpointError
    for a damaged file: far eval would refuse it too)."""
    from far.checkpoint import DIGEST_KEY, check_digest, read, read_config

    cfg = read_config(path)
    if cfg.get(DIGEST_KEY) is not None:
        config, tensors = read(path)
        check_digest(path, config, tensors)
        checksum = f"{DIGEST_KEY} of the config and tensors verified"
    else:
        checksum = "none stored (not verified)"
    arch = cfg["architecture"]
    pcfg = cfg.get("pretrained_cfg") or {}
    kwargs = arch.get("kwargs") or {}
    blocks = cfg["far"]["blocks"]
    meta = cfg.get("metadata") or {}
    size = Path(path).stat().st_size
    lines = [f"checkpoint   {path} ({size / 2**20:.2f} MiB, format {cfg['format']} v{cfg['format_version']}, "
             f"written by far {cfg.get('far_version', '?')})",
             f"architecture {arch['timm_name']}" + (f" {json.dumps(kwargs, sort_keys=True)}" if kwargs else "")]
    if pcfg.get("input_size"):
        def nums(v):
            return ", ".join(f"{x:g}" for x in v) if isinstance(v, (list, tuple)) else str(v)

        lines.append(f"input        {'x'.join(str(v) for v in pcfg['input_size'])}, "
                     f"mean ({nums(pcfg.get('mean'))}), std ({nums(pcfg.get('std'))})")
    num_classes = kwargs.get("num_classes", pcfg.get("num_classes"))
    if num_classes is not None:
        lines.append(f"classes      {num_classes}")
    if meta.get("teacher"):
        lines.append(f"teacher      {meta['teacher']}")
    lines.append(_param_line(path, blocks))
    lines.append(f"checksum     {checksum}")
    if not blocks:
        lines.append("FAR blocks   none (attention; its reuse plan is below)" if meta.get("reuse") else
                     "FAR blocks   none (a plain timm model, e.g. a teacher)")
    else:
        full = sum(2 * b["num_heads"] * b["head_dim"] for b in blocks)
        kept = sum(sum(map(sum, b["hidden_sizes"])) for b in blocks)
        units = f"LSTM units kept {kept}/{full}" if kept <= full else f"LSTM units {kept}, more than head_dim's {full}"
        lines.append(f"FAR blocks   {len(blocks)}, {units} ({100 * kept / max(full, 1):.1f}% "
                     "of head_dim per head and direction); hidden sizes per head:")
        w = max(len(b["name"]) for b in blocks)
        for b in blocks:
            fwd, bwd = b["hidden_sizes"]
            lines.append(f"  {b['name']:<{w}}  heads {b['num_heads']} x d {b['head_dim']}  fwd {fwd}  bwd {bwd}")
    fid = meta.get("fidelity")
    if isinstance(fid, dict) and isinstance(fid.get("blocks"), list):
        try:
            cells = [f"{b['isolated']['cos']:.3f}/{b['in_model']['cos']:.3f}" if b.get("isolated") else
                     f"-/{b['in_model']['cos']:.3f}" for b in fid["blocks"]]
            lines.append(f"fidelity     block cosine to the teacher, isolated/in model: {' '.join(cells)}; "
                         f"top-1 agreement {100 * fid['agreement']:.2f}% ({fid.get('num_images')} test images)")
        except (KeyError, TypeError, ValueError):
            pass  # a hand-edited record: shown raw below
    for key, val in meta.items():
        if key != "teacher":
            lines.append(f"{key:<12} {json.dumps(val, sort_keys=True, default=str)}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from far.models import resolve
    from far.version import __version__
    from far_kernels import extension_status

    if args.model:
        ref = resolve(args.model)
        if ref.kind == "timm":
            raise ConfigError(f"{args.model}: a timm model name, not a checkpoint; `far convert {args.model} -o FILE` "
                              "makes one")
        print("\n".join(checkpoint_summary(ref.path)))
        return 0
    import far

    cuda = torch.version.cuda
    print(f"far {__version__}  ({Path(far.__file__).parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__}"
          + (f" (CUDA {cuda})" if cuda else " (CPU build)")
          + f", triton {_version('triton')}, timm {_version('timm')}, torchvision {_version('torchvision')}")
    print("devices:")
    print(f"  cpu     {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    has_cuda = torch.cuda.is_available()
    if has_cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}  {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    else:
        print("  cuda    none" + (" (CPU build of torch)" if not cuda else " (no GPU visible)"))
    ext = extension_status()
    if not ext["loaded"]:
        print(f"extension: not loaded: {ext['error']}")
    else:
        print(f"extension: far_kernels._C {'with CUDA kernels' if ext['cuda'] else 'CPU kernels only'}")
    for dev in ["cpu"] + (["cuda"] if has_cuda else []):
        print(f"backends on {dev}:")
        print("\n".join(_backend_lines(dev)))
    return 0


# ---------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    import far
    from far.cli.options import model_kwargs
    from far.models import load_model, resolve, save
    from far.models.convert import parse_blocks

    ref = resolve(args.model)
    output_checks(args, [ref.path] + ([args.teacher_weights] if args.teacher_weights else []), "output")
    at_least(args, 1, "num_classes")
    args.hidden_size = parse_hidden_size(args.hidden_size)
    kwargs = model_kwargs(args)
    if args.num_classes is not None:
        if kwargs.get("num_classes", args.num_classes) != args.num_classes:
            raise ConfigError(f"--num-classes {args.num_classes} and --model-kwargs "
                              f"num_classes={kwargs['num_classes']} disagree; give one")
        kwargs["num_classes"] = args.num_classes
    older = {"value": "v"}.get(args.init, args.init)  # --init, the older name of --pre-proj-init
    if older is not None and args.pre_proj_init is not None and older != args.pre_proj_init:
        raise ConfigError(f"--init {args.init} and --pre-proj-init {args.pre_proj_init} disagree; give one "
                          "(--init is the older name of --pre-proj-init)")
    init = args.pre_proj_init or older or "v"
    blocks = parse_blocks(args.replace) if args.replace is not None else None
    if ref.kind == "timm":
        if args.pretrained and args.teacher_weights:
            raise ConfigError("give --pretrained (timm's download) or --weights FILE (a local file), not both")
        if args.teacher_weights:
            model, _ = load_model(ref, far=False, weights=args.teacher_weights, model_kwargs=kwargs)
            source = f"weights {args.teacher_weights}"
        elif args.pretrained:
            if not args.quiet:
                print(f"fetching pretrained weights of {args.model} through timm (needs a network) ...", flush=True)
            try:
                model = far.create_model(ref.name, pretrained=True, far=False, **kwargs)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - network / hub / missing-weights errors of every kind
                raise ConfigError(f"could not get pretrained weights for {args.model}: {' '.join(str(e).split())} "
                                  "(no network, or no pretrained weights exist for this model; drop --pretrained "
                                  "for a randomly initialised model, or give a local file with --weights FILE)") from e
            source = "pretrained"
        else:
            model = far.create_model(ref.name, pretrained=False, far=False, **kwargs)
            source = "random init"
    else:
        if args.pretrained:
            warn(f"--pretrained has no effect: {args.model} is a {ref.origin}, converted with its own weights")
        if args.num_classes is not None or kwargs or args.teacher_weights:
            raise ConfigError("--num-classes, --model-kwargs and --weights apply to timm model names; a checkpoint "
                              "keeps its architecture and weights (far finetune retargets its classifier)")
        model, _ = load_model(ref)
        if far.models.is_far(model):
            raise ConfigError(f"{args.model} is already a FAR model; convert an attention model")
        source = f"{ref.origin} {args.model}"
    far.convert(model, hidden_sizes=args.hidden_size, pre_proj_init=init, blocks=blocks)
    n = len(far.far_modules(model))
    if not args.quiet:
        print(f"{args.model}: {n} attention block(s) -> FAR ({source}, pre_proj init {init}, hidden size "
              f"{describe_hidden_size(args.hidden_size)}{'' if blocks is None else f', blocks {args.replace}'})")
        print(model.far_conversion.table())
    metadata = {"teacher": args.model,
                "pretrained": bool(args.pretrained or args.teacher_weights) or ref.kind != "timm",
                "init": init, "converted_by": "far convert"}
    if args.teacher_weights:
        metadata["teacher_weights"] = str(args.teacher_weights)
    if blocks is not None:
        metadata["replaced_blocks"] = blocks
    save(model, args.output, metadata=metadata, force=args.force)
    if not args.quiet:
        print(f"wrote {args.output} ({Path(args.output).stat().st_size / 2**20:.1f} MiB)")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "info", formatter_class=Formatter, help="versions, devices and kernel backends (or a checkpoint's config)",
        description="Print the far/torch/triton/timm versions, the CPU threads and CUDA devices, and every "
                    "kernel backend (torch, cpp, triton, cuda) per device with 'available' or the reason it "
                    "is not, plus what 'auto' picks. With MODEL (a checkpoint file or zoo name), print its "
                    "config instead: architecture, source teacher, per-block hidden sizes per head and "
                    "direction, and its training metadata.",
        epilog="examples:\n  far info\n  far info fmnist_far_tiny_pruned\n  far info model.safetensors\n"
               "  FAR_BACKEND=torch far info")
    add_model(p, optional=True, help="a checkpoint file or zoo name to summarise")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert", formatter_class=Formatter, help="replace every attention of a ViT by FAR and save it",
        description="Build or load MODEL (a timm ViT name such as deit_tiny_patch16_224, our Fashion-MNIST ViTs "
                    "fmnist_deit_small, or an attention checkpoint file or zoo name such as fmnist_deit_tiny, "
                    "converted with its trained weights), replace every self-attention by a multi-head BiLSTM "
                    "(FARAttention), print the parameter table (attention vs FAR per block) and write a FAR "
                    "checkpoint (safetensors + JSON config). The converted model still needs distillation "
                    "(far distill) to recover the teacher's accuracy.",
        epilog="examples:\n"
               "  far convert fmnist_deit_tiny -o fmnist_tiny.safetensors            # the zoo teacher's weights\n"
               "  far convert deit_tiny_patch16_224 --pretrained -o deit_tiny.safetensors   # needs a network\n"
               "  far convert deit_small_patch16_224 --hidden-size 32 --num-classes 100 -o small.safetensors\n"
               "  far convert timm:vit_small_patch14_dinov2 --weights dinov2_vits14.pth "
               "--model-kwargs img_size=224,num_classes=0 --replace 0-5 -o dino_far.safetensors")
    add_model(p, help="a timm model name (or timm:NAME), or an attention checkpoint file / zoo name")
    add_output(p, required=True)
    p.add_argument("--pretrained", action="store_true",
                   help="timm names: load timm's pretrained weights (downloads; needs a network)")
    p.add_argument("--hidden-size", metavar="N[,N...]",
                   help=HIDDEN_SIZE_HELP + " (default: head_dim)")
    p.add_argument("--num-classes", type=int, metavar="K", help="timm names: classifier classes (default: the model's)")
    p.add_argument("--init", choices=("value", "random"), default=None,
                   help="the older name of --pre-proj-init (value = v)")
    add_teacher_args(p, teacher=False)
    for a in p._actions:  # unset unless given, so that a disagreeing --init is seen (the default is still v)
        if a.dest == "pre_proj_init":
            a.default, a.help = None, a.help + " (default: v)"
    add_common(p, quiet="print nothing on success")
    p.set_defaults(func=cmd_convert)

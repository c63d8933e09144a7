"""Weight conversion CLI.

  python -m segjax.convert mae SRC OUT_DIR [--variant NAME] [--num-heads N]
      [--decoder-num-heads N] [--norm-pix-loss | --no-norm-pix-loss] [--ln-eps EPS]
      [--act NAME] [--ignore REGEX ...] [--posemb-order {wh,hw}] [--force]
  python -m segjax.convert mae --reverse SEGJAX_DIR OUT --format {official,timm,hf}
      [--hf-naming {legacy,v5,v5_saved}] [--force]
  python -m segjax.convert sam SRC OUT_DIR [--variant sam_vit_b] [--decoder-num-heads N] [--force]
  python -m segjax.convert sam --reverse SEGJAX_DIR OUT [--format {official,hf}] [--force]
  python -m segjax.convert maskrcnn SRC OUT_DIR [--bn-eps EPS] [--variant NAME] [--model-kwargs JSON] [--force]
  python -m segjax.convert maskrcnn --reverse SEGJAX_DIR OUT.pth [--[no-]num-batches-tracked] [--force]

SRC: official MAE `.pth`, a timm ViT `.pth`/`.safetensors`, or a Hugging Face ViTMAE
`model.safetensors` / `pytorch_model.bin` / model directory (config.json is read when
it sits beside the weights). OUT_DIR: a segjax checkpoint (`segjax.checkpoint`).
Reverse: official -> OUT (.pth, {'model': sd}); timm -> OUT (.safetensors/.pth);
hf -> directory OUT (model.safetensors + config.json).

Outputs: OUT_DIR must be new or empty, and a reverse OUT must not exist (a file) or be
empty (a directory); --force replaces: the checkpoint steps that loaders would read from
OUT_DIR (a checkpoint root, or a training workdir's checkpoints/) are deleted and the
converted checkpoint is written in their place; other files are left alone.

Exit status 2 on any error: one line naming the path and the cause (unreadable,
truncated or missing source, refused output), or the report of unmapped / missing /
mis-shaped tensors.
"""

from __future__ import annotations

import argparse
import json
import sys

from segjax.checkpoint import one_line
from segjax.convert.common import ConversionError


def _parser(sub, family: str, summary: str, src: str = "source weights",
            out: str = "the output path") -> argparse.ArgumentParser:
    """A family's subcommand with the arguments every converter takes."""
    p = sub.add_parser(family, help=summary)
    p.add_argument("src", help=f"{src} (or, with --reverse, a segjax checkpoint dir)")
    p.add_argument("out", help=f"segjax checkpoint dir (or, with --reverse, {out})")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="source keys that may be dropped (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="replace the checkpoint in a non-empty OUT_DIR (or overwrite a reverse OUT)")
    return p


def _print_converted(meta: dict, report, out: str) -> int:
    print(report.summary())
    print(json.dumps(meta, indent=2, default=str))
    print(f"wrote {out}")
    return 0


def _add_mae(sub) -> None:
    p = _parser(sub, "mae", "MAE / ViT (official, timm, Hugging Face ViTMAE)")
    p.add_argument("--variant", help="registry name to record, e.g. mae_vit_b16 (default: inferred)")
    p.add_argument("--num-heads", type=int, help="encoder heads (not stored in fused qkv weights)")
    p.add_argument("--decoder-num-heads", type=int, help="decoder heads")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="decoder target (default: config.json, else the official file name)")
    p.add_argument("--ln-eps", type=float, help="LayerNorm eps (default: config.json / 1e-6)")
    p.add_argument("--act", help="MLP activation, a transformers hidden_act name (default: config.json / gelu)")
    p.add_argument("--posemb-order", choices=("wh", "hw"), default="wh",
                   help="channel order of a generated decoder_pos_embed (HF checkpoints without it)")
    p.add_argument("--reverse", action="store_true", help="segjax -> torch")
    p.add_argument("--format", choices=("official", "timm", "hf"), help="target format for --reverse")
    p.add_argument("--hf-naming", choices=("legacy", "v5", "v5_saved"), default="legacy",
                   help="key spelling for --format hf (legacy = the hub's, loads in 4.x and 5.x)")
    p.set_defaults(run=_run_mae)


def _run_mae(args) -> int:
    from segjax.convert import mae

    if args.reverse:
        if not args.format:
            raise ConversionError("--reverse needs --format {official,timm,hf}")
        notes: list[str] = []
        path = mae.export(args.src, args.out, args.format, args.hf_naming, force=args.force, notes=notes)
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {args.format} weights to {path}")
        return 0
    meta, report = mae.convert(
        args.src, args.out, force=args.force, variant=args.variant, num_heads=args.num_heads,
        decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss,
        ln_eps=args.ln_eps, act=args.act, ignore=args.ignore, posemb_order=args.posemb_order)
    shown = {k: v for k, v in meta.items() if k != "source"}
    shown["source"] = {k: v for k, v in meta["source"].items() if k != "hf_config"}
    return _print_converted(shown, report, args.out)


def _add_sam(sub) -> None:
    p = _parser(sub, "sam", "Segment Anything (official segment_anything .pth, Hugging Face SamModel)")
    p.add_argument("--variant", help="assert and record this registry name, e.g. sam_vit_b (default: inferred)")
    p.add_argument("--decoder-num-heads", type=int,
                   help="mask decoder heads (not in the weights; default config.json / 8)")
    p.add_argument("--reverse", action="store_true", help="segjax -> torch")
    p.add_argument("--format", choices=("official", "hf"), default="official",
                   help="target format for --reverse (official: flat .pth for sam_model_registry)")
    p.set_defaults(run=_run_sam)


def _run_sam(args) -> int:
    from segjax.convert import sam

    if args.reverse:
        path = sam.export(args.src, args.out, args.format, force=args.force)
        print(f"wrote {args.format} weights to {path}")
        return 0
    meta, report = sam.convert(args.src, args.out, force=args.force, variant=args.variant,
                               decoder_num_heads=args.decoder_num_heads, ignore=args.ignore)
    return _print_converted({k: v for k, v in meta.items() if k != "source"}, report, args.out)


def _add_maskrcnn(sub) -> None:
    p = _parser(sub, "maskrcnn", "torchvision Mask R-CNN (maskrcnn_resnet50_fpn, _v2)",
                src="torchvision state dict .pth/.safetensors", out="the output .pth path")
    p.add_argument("--bn-eps", type=float,
                   help="backbone BatchNorm eps (default: 0 for legacy COCO weights without "
                        "num_batches_tracked, else 1e-5)")
    p.add_argument("--variant", help="registry name whose defaults fill anchors/thresholds/sizes "
                                     "(default mask_rcnn_r50_fpn[_v2])")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of MaskRCNN field overrides")
    p.add_argument("--reverse", action="store_true", help="segjax -> torchvision state dict")
    p.add_argument("--num-batches-tracked", action=argparse.BooleanOptionalAction, default=None,
                   help="--reverse: write nn.BatchNorm2d counters (default: as the source had)")
    p.set_defaults(run=_run_maskrcnn)


def _run_maskrcnn(args) -> int:
    from segjax.convert import maskrcnn

    if args.reverse:
        path = maskrcnn.export(args.src, args.out, args.num_batches_tracked, force=args.force)
        print(f"wrote torchvision weights to {path}")
        return 0
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except ValueError as e:
        raise ConversionError(f"--model-kwargs is not JSON ({one_line(e)})") from e
    if not isinstance(model_kwargs, dict):
        raise ConversionError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    meta, report = maskrcnn.convert(args.src, args.out, force=args.force, bn_eps=args.bn_eps,
                                    variant=args.variant, model_kwargs=model_kwargs, ignore=args.ignore)
    return _print_converted(meta, report, args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segjax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="family", required=True)
    _add_mae(sub)
    _add_sam(sub)
    _add_maskrcnn(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an unwritable output: the path and the cause, no traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`python -m segjax.annotate IMAGE_DIR --checkpoint SAM_CKPT --out annotations.json`

Serves the click-to-segment page for the images of IMAGE_DIR on 127.0.0.1 (unless
--host) and prints its address. Accepted masks go to --out (COCO instances JSON,
rewritten atomically on every change; an existing file is resumed). Embeddings are
cached under --cache-dir (default: `.segjax_annotate_cache` next to --out).

Exit status: 0 after a clean shutdown, 2 for bad arguments or an unusable --out /
checkpoint / IMAGE_DIR (with a one-line message).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PORT = 8765


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m segjax.annotate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image_dir", help="folder of images (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="segjax SAM checkpoint (python -m segjax.convert sam ...)")
    p.add_argument("--out", required=True, help="COCO JSON to write (resumed if it exists)")
    p.add_argument("--categories", default="", help="comma-separated category names, e.g. cat,dog")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: next to --out)")
    p.add_argument("--detector", default=None, help="Mask R-CNN checkpoint whose detections 'propose' offers "
                                                    "(default: SAM's automatic mask generator)")
    p.add_argument("--propose-points", type=int, default=16,
                   help="automatic mask generator grid: points per side (default 16)")
    p.add_argument("--propose-iou-thresh", type=float, default=0.88,
                   help="automatic mask generator: least predicted IoU (default 0.88)")
    p.add_argument("--propose-stability-thresh", type=float, default=0.95,
                   help="automatic mask generator: least stability score (default 0.95)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="SAM compute dtype")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """(ASGI app, Segmenter) from parsed arguments; ValueError/OSError on bad inputs."""
    import jax.numpy as jnp

    from segjax.annotate.embedding_cache import CachingSamPredictor, EmbeddingCache, checkpoint_identity
    from segjax.annotate.images import IMAGE_SUFFIXES, ImageFolder
    from segjax.annotate.segmenter import Segmenter
    from segjax.annotate.server import LOOPBACK_NAMES, create_app
    from segjax.annotate.store import AnnotationStore

    folder = ImageFolder(args.image_dir)
    if not folder.names:
        raise ValueError(f"no image files ({' '.join(IMAGE_SUFFIXES)}) in {args.image_dir}")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    store = AnnotationStore(args.out, categories)
    if not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint} is not a checkpoint folder")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    predictor = CachingSamPredictor.from_checkpoint(args.checkpoint, dtype=dtype)
    cache_dir = args.cache_dir or os.path.join(os.path.dirname(store.path), ".segjax_annotate_cache")
    predictor.attach_cache(EmbeddingCache(os.path.join(cache_dir, "embeddings")),
                           checkpoint_identity(args.checkpoint, {**predictor.meta, "dtype": args.dtype}))
    detector = None
    if args.detector:
        from segjax.inference.maskrcnn_predictor import MaskRCNNPredictor

        detector = MaskRCNNPredictor.from_checkpoint(args.detector)
    if args.propose_points < 1:
        raise ValueError("--propose-points must be >= 1")
    seg = Segmenter(folder, predictor, store, os.path.join(cache_dir, "logits"), detector,
                    {"points_per_side": args.propose_points, "pred_iou_thresh": args.propose_iou_thresh,
                     "stability_score_thresh": args.propose_stability_thresh})
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    return create_app(seg, args.max_body_bytes, LOOPBACK_NAMES if loopback else None), seg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        app, seg = build(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(128)  # connections made from now on wait for uvicorn
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"segjax annotate: {len(seg.images.names)} images in {seg.images.root}, annotations -> "
          f"{seg.store.path}\nserving on http://{shown}:{port}/", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

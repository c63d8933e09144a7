"""A local click-to-segment annotation page over SAM that writes COCO-format training data.

`python -m segjax.annotate IMAGE_DIR --checkpoint SAM_CKPT --out annotations.json`
(see `__main__`). Parts: `images` (the folder, safe name resolution), `store` (the
COCO JSON, atomic writes, undo / redo), `embedding_cache` (embeddings on disk keyed
by content), `segmenter` (predictions and proposals kept per session), `server`
(FastAPI endpoints), `static/` (the page: HTML + JavaScript + canvas, no build step).
"""

"""What the annotation server computes: embeddings, click predictions, proposals.

Legend: M candidate masks (3 for a single click, else 1), K proposals, (H, W) image
size, (lh, lw) low-res mask size.

Predictions are kept server-side per browser session (the last `MAX_PREDICTIONS`),
each with its candidates' low-res logits, so the next click sends only a reference
({pred_id, index}) and the model gets those logits as its mask prompt, the way SAM
was trained for interactive refinement. Accepting stores the chosen candidate's mask
in the annotation file and keeps its low-res logits (in memory and in the cache
folder), so editing an accepted mask later starts from them.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
import uuid
from typing import Any

import numpy as np

from segjax.annotate.embedding_cache import CachingSamPredictor
from segjax.annotate.images import ImageFolder
from segjax.annotate.store import AnnotationStore
from segjax.atomic_write import atomic_open

MAX_PREDICTIONS = 32
MAX_SESSIONS = 32
MAX_OPEN_IMAGES = 4


class UnknownReference(KeyError):
    """A prediction / annotation reference that does not exist (any more)."""


class Prediction:
    """One prediction: M candidate masks with their IoU estimates.

    bits: (M, ceil(H * W / 8)) uint8, each mask row-major packed 8 pixels a byte
    (`np.packbits`), what the page draws; size: (H, W).
    """

    def __init__(self, image: str, masks: np.ndarray, scores: list[float], low_res: np.ndarray | None,
                 prompt: dict, source: str):
        masks = np.asarray(masks, bool)
        self.image, self.size, self.scores = image, tuple(masks.shape[1:]), scores
        self.bits = np.packbits(masks.reshape(len(masks), -1), axis=1)
        self.low_res = low_res  # (M, lh, lw) float32 or None (proposals)
        self.prompt, self.source = prompt, source
        self.id = uuid.uuid4().hex[:16]

    def __len__(self) -> int:
        return len(self.bits)

    def mask(self, index: int) -> np.ndarray:
        """(H, W) bool of candidate `index`."""
        h, w = self.size
        return np.unpackbits(self.bits[self._check(index)], count=h * w).reshape(h, w).astype(bool)

    def _check(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise UnknownReference(f"prediction {self.id} has {len(self)} candidates, not index {index}")
        return index


class Segmenter:
    """SAM (and optionally a Mask R-CNN detector) over an `ImageFolder`."""

    def __init__(self, images: ImageFolder, predictor: CachingSamPredictor, store: AnnotationStore,
                 logits_dir: str, detector: Any = None, amg_kwargs: dict | None = None):
        self.images, self.predictor, self.store, self.detector = images, predictor, store, detector
        self.logits_dir = logits_dir
        self.amg_kwargs = dict(amg_kwargs or {})
        self._sessions: collections.OrderedDict[str, collections.OrderedDict[str, Prediction]] = \
            collections.OrderedDict()
        self._lock = threading.RLock()  # one model call at a time
        self._amg = None
        self._by_name: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    # ------------------------------------------------------------------ embedding
    def embed(self, name: str):
        """(SamImage, seconds, from_cache) of a listed image. The last images opened are
        remembered by name (while their file's size and mtime stay), so a click does not
        decode and hash the file again."""
        st = os.stat(self.images.path(name))
        tag = (st.st_size, st.st_mtime_ns)
        t0 = time.perf_counter()
        with self._lock:
            known = self._by_name.get(name)
            if known is not None and known[0] == tag:
                self._by_name.move_to_end(name)
                return known[1], time.perf_counter() - t0, True
        image = self.images.read(name)
        with self._lock:
            t0 = time.perf_counter()
            emb = self.predictor.embed_images([image])[0]
            emb.features.block_until_ready()
            self._by_name[name] = (tag, emb)
            while len(self._by_name) > MAX_OPEN_IMAGES:
                self._by_name.popitem(last=False)
            return emb, time.perf_counter() - t0, self.predictor.last_hits == 1

    # ------------------------------------------------------------------ predictions
    def _session(self, session: str) -> collections.OrderedDict[str, Prediction]:
        with self._lock:
            preds = self._sessions.setdefault(session, collections.OrderedDict())
            self._sessions.move_to_end(session)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
            return preds

    def _keep(self, session: str, pred: Prediction) -> Prediction:
        preds = self._session(session)
        preds[pred.id] = pred
        while len(preds) > MAX_PREDICTIONS:
            preds.popitem(last=False)
        return pred

    def prediction(self, session: str, pred_id: str) -> Prediction:
        pred = self._session(session).get(pred_id)
        if pred is None:
            raise UnknownReference(f"unknown or expired prediction {pred_id!r} (predict again)")
        return pred

    def mask_prompt(self, session: str, name: str, ref: dict | None) -> np.ndarray | None:
        """ref {pred_id, index} or {annotation} -> (lh, lw) low-res logits, or None."""
        if ref is None:
            return None
        if ref.get("annotation") is not None:
            ann = self.store.get(int(ref["annotation"]))
            if self.store.file_name_of(ann["image_id"]) != name:
                raise UnknownReference(f"annotation {ann['id']} belongs to another image")
            return self.annotation_logits(ann["id"])
        pred = self.prediction(session, ref["pred_id"])
        if pred.image != name:
            raise UnknownReference(f"prediction {pred.id} belongs to another image")
        pred._check(int(ref.get("index", 0)))
        return None if pred.low_res is None else pred.low_res[int(ref.get("index", 0))]

    def predict(self, session: str, name: str, points: list, labels: list, box: list | None,
                mask_ref: dict | None, multimask: bool) -> Prediction:
        """Points (N, 2) (x, y) / labels (N,) 1 fg, 0 bg / box XYXY, all in original pixels."""
        emb, _, _ = self.embed(name)
        mask_input = self.mask_prompt(session, name, mask_ref)
        pc = [np.asarray(points, np.float64).reshape(-1, 2)] if points else None
        pl = [np.asarray(labels, np.int64)] if points else None
        bx = None if box is None else np.asarray(box, np.float64).reshape(1, 4)
        mi = None if mask_input is None else mask_input[None, None]
        with self._lock:
            masks, iou, low = self.predictor.predict_batch(pc, pl, bx, mi, multimask_output=multimask, image=emb)
        order = np.argsort(-iou[0], kind="stable")  # best estimated IoU first
        prompt = {"points": [list(map(float, p)) for p in points], "labels": [int(v) for v in labels],
                  "box": None if box is None else [float(v) for v in box]}
        pred = Prediction(name, masks[0][order], [float(v) for v in iou[0][order]],
                          low[0][order], prompt, "click")
        return self._keep(session, pred)

    # ------------------------------------------------------------------ proposals
    def propose(self, session: str, name: str) -> Prediction:
        """Candidate masks for the whole image, best first: the detector's if one was
        given, else SAM's automatic mask generator (on the cached embedding)."""
        image = self.images.read(name)
        with self._lock:
            if self.detector is not None:
                out = self.detector(image)
                masks = out["masks"][:, 0] > 0.5
                keep = masks.reshape(len(masks), -1).any(-1)
                cands = masks[keep]
                scores = [float(s) for s in out["scores"][keep]]
                labels = [int(v) for v in out["labels"][keep]]
                prompts = [{"points": [], "labels": [], "box": [float(v) for v in b], "label": lab}
                           for b, lab in zip(out["boxes"][keep], labels)]
            else:
                if self._amg is None:
                    from segjax.inference.sam.amg import SamAutomaticMaskGenerator

                    self._amg = SamAutomaticMaskGenerator(self.predictor, output_mode="binary_mask",
                                                          **self.amg_kwargs)
                records = sorted(self._amg.generate(image), key=lambda r: -r["predicted_iou"])
                cands = np.stack([r["segmentation"] for r in records]) if records else \
                    np.zeros((0, *image.shape[:2]), bool)
                scores = [float(r["predicted_iou"]) for r in records]
                prompts = [{"points": [list(map(float, r["point_coords"][0]))], "labels": [1], "box": None}
                           for r in records]
        pred = Prediction(name, cands, scores, None, {"candidates": prompts}, "propose")
        return self._keep(session, pred)

    # ------------------------------------------------------------------ accepted masks
    def _logits_file(self, ann_id: int) -> str:
        tag = hashlib.sha256(self.store.path.encode()).hexdigest()[:16]
        return os.path.join(self.logits_dir, tag, f"{int(ann_id)}.npy")

    def save_logits(self, ann_id: int, low_res: np.ndarray | None) -> None:
        path = self._logits_file(ann_id)
        if low_res is None:
            if os.path.exists(path):
                os.unlink(path)
            return
        with atomic_open(path) as f:
            np.save(f, np.asarray(low_res, np.float32))

    def annotation_logits(self, ann_id: int) -> np.ndarray | None:
        try:
            return np.load(self._logits_file(ann_id))
        except (OSError, ValueError):
            return None

    def chosen(self, session: str, name: str, pred_id: str, index: int) -> tuple[np.ndarray, dict, float, Any]:
        """(mask (H, W) bool, prompt, score, low-res logits or None) of a candidate."""
        pred = self.prediction(session, pred_id)
        if pred.image != name:
            raise UnknownReference(f"prediction {pred_id} belongs to another image")
        mask = pred.mask(index)
        prompt = pred.prompt["candidates"][index] if "candidates" in pred.prompt else pred.prompt
        low = None if pred.low_res is None else pred.low_res[index]
        return mask, prompt, pred.scores[index], low


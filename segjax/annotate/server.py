"""The annotation web server: JSON endpoints over a `Segmenter` + the static page.

Endpoints (JSON unless stated; every error is a 4xx JSON {"detail": message}):
  GET  /                          the page (static/index.html)
  GET  /api/images                [{name, height, width, annotations, done}] + categories
  GET  /api/image?name=N          the image file's bytes
  POST /api/embed                 {image} -> {seconds, cached, height, width}
  POST /api/predict               {session, image, points [[x, y]], labels [1|0], box
                                  [x0, y0, x1, y1] | null, mask: {pred_id, index} |
                                  {annotation} | null, multimask} -> {pred_id,
                                  size [H, W], candidates: [{index, score, bits}],
                                  seconds}, bits: base64 of the (H, W) mask packed
                                  row-major 8 pixels a byte, first pixel in the high
                                  bit; prompts in pixels of the original image, x in
                                  [0, W], y in [0, H]
  POST /api/propose               {session, image} -> the same as predict
  GET  /api/annotations?image=N   that image's annotations
  POST /api/annotations           {session, image, pred_id, index, category} -> annotation
  PATCH /api/annotations/{id}     {session, pred_id?, index?, category?} -> annotation
  DELETE /api/annotations/{id}    -> the deleted annotation
  POST /api/undo, /api/redo       -> {op, annotation} (404 when there is nothing to undo)
  POST /api/done                  {image, done}
  GET  /api/export                the COCO JSON (as a download)

Request bodies are bounded (`max_body_bytes`, 413 beyond), state-changing requests
must be JSON and the Host a loopback name (see `RequestGuard`), numbers must be finite
(pydantic `allow_inf_nan=False`), and exception handlers turn every failure into a
message: validation 422, bad values 400, unknown names/ids 404, size 413; an
unexpected error is a 500 with its one-line message, never a traceback.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from segjax.annotate.images import ImageNameError
from segjax.annotate.segmenter import Prediction, Segmenter, UnknownReference
from segjax.inference.sam.transforms import SamInputError

_log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_POINTS = 64
MAX_NAME = 1024
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
               ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"}

Coord = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Session = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Category = Annotated[str, Field(min_length=1, max_length=100)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MaskRef(_Body):
    pred_id: str | None = Field(default=None, max_length=64)
    index: int = Field(default=0, ge=0, le=1000)
    annotation: int | None = None


class PredictBody(_Body):
    session: Session
    image: Name
    points: list[tuple[Coord, Coord]] = Field(default_factory=list, max_length=MAX_POINTS)
    labels: list[Annotated[int, Field(ge=0, le=1)]] = Field(default_factory=list, max_length=MAX_POINTS)
    box: tuple[Coord, Coord, Coord, Coord] | None = None
    mask: MaskRef | None = None
    multimask: bool = True


class ImageBody(_Body):
    session: Session = "default"
    image: Name


class AcceptBody(_Body):
    session: Session
    image: Name
    pred_id: str = Field(max_length=64)
    index: int = Field(default=0, ge=0, le=1000)
    category: Category


class EditBody(_Body):
    session: Session
    pred_id: str | None = Field(default=None, max_length=64)
    index: int = Field(default=0, ge=0, le=1000)
    category: Category | None = None


class DoneBody(_Body):
    image: Name
    done: bool = True


class RequestGuard:
    """ASGI middleware in front of the app.

    413 for a request body over `limit` bytes (declared or streamed); 415 for a
    state-changing request (POST, PATCH, DELETE, PUT) that is not `application/json`,
    which a page of another site cannot send here without a CORS preflight that this
    server never grants; 421 for a Host header other than the allowed names (a DNS
    rebinding page), unless `allowed_hosts` is None (an explicit --host other than a
    loopback address).
    """

    def __init__(self, app, limit: int, allowed_hosts: set[str] | None):
        self.app, self.limit, self.allowed_hosts = app, limit, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if self.allowed_hosts is not None:
            host = _host_name(headers.get(b"host", b""))
            if host not in self.allowed_hosts:
                return await _send_json(send, 421, f"unexpected Host header {host!r}")
        if scope["method"] in ("POST", "PATCH", "PUT", "DELETE"):
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return await _send_json(send, 415, "state-changing requests must be application/json")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_json(send, 413, f"request body over {self.limit} bytes")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await _send_json(send, 413, f"request body over {self.limit} bytes")


LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]"}


def _host_name(value: bytes) -> str:
    """b'127.0.0.1:8765' -> '127.0.0.1', b'[::1]:8765' -> '[::1]'."""
    v = value.decode("latin-1").strip().lower()
    if v.startswith("["):
        return v.split("]")[0] + "]"
    return v.rsplit(":", 1)[0]


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _candidates(pred: Prediction, seconds: float) -> Response:
    """The prediction as JSON: each candidate's mask as base64 of its packed bits."""
    cands = pred.prompt.get("candidates")
    body = {"pred_id": pred.id, "source": pred.source, "seconds": seconds, "size": list(pred.size),
            "candidates": [{"index": i, "score": s, "bits": base64.b64encode(b.tobytes()).decode("ascii"),
                            "prompt": None if cands is None else cands[i]}
                           for i, (s, b) in enumerate(zip(pred.scores, pred.bits))]}
    return Response(json.dumps(body, allow_nan=False), media_type="application/json")


def _check_inside(points, box, hw: tuple[int, int], name: str) -> None:
    h, w = hw
    for x, y in points:
        if not (0 <= x <= w and 0 <= y <= h):
            raise SamInputError(f"point ({x}, {y}) is outside image {name!r} of {w}x{h} (x in [0, {w}], "
                                f"y in [0, {h}])")
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
            raise SamInputError(f"box {list(box)} must satisfy 0 <= x0 <= x1 <= {w} and 0 <= y0 <= y1 <= {h}")


def create_app(seg: Segmenter, max_body_bytes: int = MAX_BODY_BYTES,
               allowed_hosts: set[str] | None = frozenset(LOOPBACK_NAMES)) -> Any:
    """The ASGI application serving `seg` (its ImageFolder, store and models): the
    FastAPI app behind `RequestGuard`."""
    app = FastAPI(title="segjax annotate", docs_url=None, redoc_url=None, openapi_url=None)
    store, folder = seg.store, seg.images
    static = resources.files("segjax.annotate") / "static"

    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msgs = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            msgs.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error(422, "invalid request: " + "; ".join(msgs))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(ImageNameError)
    async def _name(request: Request, exc: ImageNameError):
        return error(404, str(exc))

    @app.exception_handler(UnknownReference)
    async def _ref(request: Request, exc: UnknownReference):
        return error(404, exc.args[0] if exc.args else "unknown reference")

    @app.exception_handler(KeyError)
    async def _key(request: Request, exc: KeyError):
        return error(404, exc.args[0] if exc.args else "not found")

    @app.exception_handler(ValueError)  # SamInputError, store.StoreError, undecodable images
    async def _value(request: Request, exc: ValueError):
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception):
        _log.exception("request %s failed", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    @app.get("/")
    def index():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/images")
    def images():
        progress = store.progress()
        rows = []
        for name in folder.names:
            try:
                h, w = folder.size(name)
            except ValueError:  # listed, refused when opened (with the decoder's message)
                h = w = 0
            p = progress.get(name, {"annotations": 0, "done": False})
            rows.append({"name": name, "height": h, "width": w, **p})
        return {"images": rows, "categories": store.categories(), "out": store.path}

    @app.get("/api/image")
    def image(name: str):
        path = folder.path(name)
        return Response(folder.read_bytes(name), media_type=MEDIA_TYPES.get(path.suffix.lower(),
                                                                            "application/octet-stream"))

    @app.post("/api/embed")
    def embed(body: ImageBody):
        emb, seconds, cached = seg.embed(body.image)
        h, w = emb.original_size
        return {"seconds": seconds, "cached": cached, "height": h, "width": w}

    @app.post("/api/predict")
    def predict(body: PredictBody):
        if len(body.points) != len(body.labels):
            raise SamInputError(f"{len(body.points)} points but {len(body.labels)} labels")
        if not body.points and body.box is None:
            raise SamInputError("a prediction needs at least one point or a box")
        emb, _, _ = seg.embed(body.image)  # cached after the first open; decodes and checks the file
        _check_inside(body.points, body.box, emb.original_size, body.image)
        t0 = time.perf_counter()
        pred = seg.predict(body.session, body.image, body.points, body.labels, body.box,
                           None if body.mask is None else body.mask.model_dump(), body.multimask)
        return _candidates(pred, time.perf_counter() - t0)

    @app.post("/api/propose")
    def propose(body: ImageBody):
        t0 = time.perf_counter()
        pred = seg.propose(body.session, body.image)
        return _candidates(pred, time.perf_counter() - t0)

    @app.get("/api/annotations")
    def annotations(image: str):
        folder.path(image)
        return {"annotations": store.annotations(image), "categories": store.categories()}

    @app.post("/api/annotations")
    def accept(body: AcceptBody):
        folder.path(body.image)
        mask, prompt, score, low = seg.chosen(body.session, body.image, body.pred_id, body.index)
        pred = seg.prediction(body.session, body.pred_id)
        ann = store.add(body.image, mask.shape, mask, body.category, prompt, score, pred.source)
        seg.save_logits(ann["id"], low)
        return ann

    @app.patch("/api/annotations/{ann_id}")
    def edit(ann_id: int, body: EditBody):
        ann = store.get(ann_id)
        name = store.file_name_of(ann["image_id"])
        mask = prompt = score = low = None
        if body.pred_id is not None:
            mask, prompt, score, low = seg.chosen(body.session, name, body.pred_id, body.index)
        elif body.category is None:
            raise SamInputError("nothing to change: give pred_id (a new mask) and/or category")
        new = store.update(ann_id, mask, body.category, prompt, score)
        if body.pred_id is not None:
            seg.save_logits(ann_id, low)
        return new

    @app.delete("/api/annotations/{ann_id}")
    def delete(ann_id: int):
        return store.delete(ann_id)

    def history(which: str):
        def step():
            out = getattr(store, which)()
            if out is None:
                return error(404, f"nothing to {which}")
            if out["op"] == "update":  # the stored logits belong to the other version of the mask
                seg.save_logits(out["annotation"]["id"], None)
            return out
        app.post(f"/api/{which}", name=which)(step)

    history("undo")
    history("redo")

    @app.post("/api/done")
    def done(body: DoneBody):
        store.set_done(body.image, folder.read(body.image).shape[:2], body.done)  # decodes: no corrupt files
        return {"image": body.image, "done": body.done}

    @app.get("/api/export")
    def export():
        return JSONResponse(store.export(), headers={
            "Content-Disposition": 'attachment; filename="annotations.json"'})

    return RequestGuard(app, max_body_bytes, None if allowed_hosts is None else set(allowed_hosts))

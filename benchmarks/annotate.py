"""Click round trips of the annotation page, measured in the browser, with SAM ViT-B.

Setup: a seeded random official SAM ViT-B (`segjax.testing.sam_official.VIT_B`, every
tensor random) converted with `python -m segjax.convert sam`; the SAM benchmark's photo
(skimage `coffee` upscaled x2 with PIL bicubic: 800 x 1200, see benchmarks/sam.py) as
the only image of a folder; `python -m segjax.annotate` on it (fp32 unless --dtype) and
the page in the distribution's headless Chromium (Selenium).

Measured:
  first open    the server's embedding time of the image (what the page shows), and
                the page's time from navigation to image + annotations + embedding ready
  click         per click, JavaScript `performance.now()` from sending the request to
                the overlay drawn (window.segjaxTimings), and the server's share (model,
                RLE encoding; window.segjaxModelTimes). Rounds of: a foreground click
                (3 candidates), a second foreground click and a background click (each
                one mask, the previous candidate's logits as the mask prompt), Esc. The
                first round (XLA compilation) is reported on its own; the median is over
                the other rounds' clicks.

  python benchmarks/annotate.py                   # ViT-B, 10 rounds (30 clicks)
  python benchmarks/annotate.py --rounds 20 --dtype bfloat16

Recorded figures, with date, machine and command: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)


def _sam_benchmark_image(scale: float):
    """The photo of benchmarks/sam.py (its `_image`)."""
    spec = importlib.util.spec_from_file_location("_sam_bench", os.path.join(_REPO, "benchmarks", "sam.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._image(scale)


def _screenshot(drv, path: str, w: int, h: int, n: int) -> None:
    """Accepts a mask of the cup, starts another (a click and a box on the saucer) and
    saves the page."""
    from PIL import Image

    from segjax.testing.annotate_page import click, drag, keys, wait_for

    click(drv, 0.5 * w, 0.45 * h)
    wait_for(drv, "return document.body.dataset.predictions", str(n + 1), timeout=600)
    wait_for(drv, "return window.segjax.state.inflight", False, timeout=600)
    keys(drv, "\ue007")  # Enter: accept
    wait_for(drv, "return document.querySelectorAll('#annotation-list li').length", 1, timeout=600)
    drag(drv, 0.2 * w, 0.55 * h, 0.8 * w, 0.95 * h)
    wait_for(drv, "return document.body.dataset.predictions", str(n + 2), timeout=600)
    click(drv, 0.3 * w, 0.8 * h)
    wait_for(drv, "return document.body.dataset.predictions", str(n + 3), timeout=600)
    wait_for(drv, "return window.segjax.state.inflight", False, timeout=600)
    raw = path + ".raw.png"
    drv.save_screenshot(raw)
    im = Image.open(raw).convert("RGB")
    im = im.resize((1000, round(im.height * 1000 / im.width)), Image.LANCZOS)
    im.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
    os.unlink(raw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--scale", type=float, default=2.0, help="photo scale (2: 800 x 1200)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--checkpoint", default=None, help="an existing segjax SAM checkpoint (default: convert one)")
    p.add_argument("--window", default="1600x1000", help="browser window WxH")
    p.add_argument("--screenshot", default=None,
                   help="after the timing: accept a mask, click again and save the page as this PNG "
                        "(1000 px wide, 256 colours: the README's picture)")
    args = p.parse_args(argv)

    from PIL import Image

    from segjax.testing.annotate_page import AnnotateServer, click, headless_chromium, keys, wait_for

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            from segjax.testing.sam_official import VIT_B, converted

            t0 = time.perf_counter()
            _, ckpt = converted(tmp, VIT_B, seed=0)
            os.unlink(os.path.join(tmp, "sam.pth"))
            print(f"converted ViT-B in {time.perf_counter() - t0:.1f} s", flush=True)
        image = _sam_benchmark_image(args.scale)
        h, w = image.shape[:2]
        os.makedirs(os.path.join(tmp, "images"))
        Image.fromarray(image).save(os.path.join(tmp, "images", "coffee.png"))
        server = AnnotateServer(os.path.join(tmp, "images"), ckpt, os.path.join(tmp, "ann.json"),
                                "--categories", "cup", "--dtype", args.dtype,
                                "--cache-dir", os.path.join(tmp, "cache"))
        ww, wh = (int(v) for v in args.window.split("x"))
        drv = headless_chromium(size=(ww, wh))
        try:
            t0 = time.perf_counter()
            drv.get(server.url + "/")
            wait_for(drv, "return document.body.dataset.opened", "coffee.png", timeout=600)
            page_open = time.perf_counter() - t0
            embed_text = drv.find_element("id", "embed-status").text
            # clicks on the cup and its saucer, a background click on the table, shifted per round
            base = [((0.50, 0.45), False), ((0.42, 0.55), False), ((0.10, 0.10), True)]
            n = 0
            for r in range(args.rounds):
                for (fx, fy), bg in base:
                    dx = 0.01 * (r % 5)
                    click(drv, (fx + dx) * w, (fy + dx) * h, right=bg)
                    n += 1
                    wait_for(drv, "return document.body.dataset.predictions", str(n), timeout=600)
                    wait_for(drv, "return window.segjax.state.inflight", False, timeout=600)
                keys(drv, "\ue00c")  # Esc: next round starts a new object
            times = drv.execute_script("return window.segjaxTimings")
            model = drv.execute_script("return window.segjaxModelTimes")
            scale = drv.execute_script("return window.segjax.state.scale")
            if args.screenshot:
                _screenshot(drv, args.screenshot, w, h, n)
        finally:
            drv.quit()
            server.kill()
    k = len(base)
    steady, steady_model = times[k:], model[k:]
    out = {
        "image": f"{h}x{w}", "dtype": args.dtype, "canvas_scale": round(scale, 3),
        "embed_first_open": embed_text, "page_open_s": round(page_open, 2),
        "first_round_ms": [round(t, 1) for t in times[:k]],
        "clicks": len(steady),
        "click_round_trip_median_ms": round(statistics.median(steady), 1) if steady else None,
        "click_round_trip_p90_ms": round(sorted(steady)[int(0.9 * (len(steady) - 1))], 1) if steady else None,
        "server_median_ms": round(statistics.median(steady_model), 1) if steady else None,
        "by_click_median_ms": {name: round(statistics.median(steady[i::k]), 1) for i, name in
                               enumerate(("1 point (3 masks)", "2 points + mask", "3 points + mask"))}
        if steady else None,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test helpers for media: tiny synthetic videos written with PyAV and a localhost HTTP server.

`make_video(path, num_frames=12, fps=6)` writes an mp4 whose content moves every frame (so frame
indices are visible in the pixels); `serve_folder(folder)` serves files on 127.0.0.1 with extra
routes: /slow/<name> (answers after `slow_seconds`), /loop (redirects to itself), /hop/<k>/<name>
(k redirects, then the file), /huge (endless body without Content-Length).
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np


def moving_frame(index: int, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3): a smooth gradient with a bright square whose position encodes `index`."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                      np.full_like(x, (index * 37) % 256)], axis=-1).astype(np.uint8)
    side = max(4, min(height, width) // 4)
    top = (index * 3) % max(height - side, 1)
    left = (index * 5) % max(width - side, 1)
    frame[top:top + side, left:left + side] = 255
    return frame


def make_video(
    path: str | Path,
    num_frames: int = 12,
    fps: float | Fraction = 6,
    width: int = 64,
    height: int = 48,
    codec: str = "mpeg4",
) -> Path:
    """Write an mp4 of `num_frames` moving frames at `fps` (yuv420p, high quality); returns the path."""
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {"crf": "10"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(moving_frame(i, height, width), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class _Handler(http.server.SimpleHTTPRequestHandler):
    slow_seconds = 3.0

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        with contextlib.suppress(ConnectionError):  # clients may hang up early (size caps, timeouts)
            self._get()

    def _get(self) -> None:
        route = self.path.split("?")[0]
        if route.startswith("/slow/"):
            time.sleep(self.slow_seconds)
            self.path = route[len("/slow"):]
        elif route == "/loop":
            return self._redirect("/loop")
        elif route.startswith("/hop/"):
            _, _, hops, name = route.split("/", 3)
            target = f"/hop/{int(hops) - 1}/{name}" if int(hops) > 1 else f"/{name}"
            return self._redirect(target)
        elif route == "/huge":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            for _ in range(4096):
                self.wfile.write(b"\0" * 65536)
            return None
        return super().do_GET()

    def _redirect(self, target: str) -> None:
        self.send_response(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextlib.contextmanager
def serve_folder(folder: str | Path, slow_seconds: float = 3.0) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (random port) in a thread; yields the base URL without a slash."""
    handler = type("Handler", (_Handler,), {"slow_seconds": slow_seconds})

    def make(*args, **kwargs):
        return handler(*args, directory=str(folder), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

"""The media I/O boundary: image/video sources (paths, file:// and http(s) URLs, data: URIs,
base64, bytes, PIL, arrays, conversation content items) -> RGB PIL images or decoded frames.

Imports only `qwen2vl.errors`; PyAV is imported lazily by the video functions. Every failure is a
MediaError reading `<where>: <source>: <what is wrong>; <what is allowed>`.

    >>> img = load_image("photo.jpg")                         # EXIF orientation applied
    >>> img = load_image({"type": "image", "image": "https://example.com/a.png"}, timeout=5.0)
    >>> frames, info = load_video("clip.mp4", indices_fn=lambda total, fps: range(0, total, 15))
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from qwen2vl.errors import MediaError, MissingDependencyError

logger = logging.getLogger(__name__)

# Decompression-bomb guard: images above this many pixels are refused before decoding.
MAX_IMAGE_PIXELS = 178_956_970  # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS)
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
MAX_REDIRECTS = 5

# Content-item keys (transformers' chat template and qwen-vl-utils), in lookup order.
IMAGE_KEYS = ("image", "image_url", "url", "path", "base64")
VIDEO_KEYS = ("video", "url", "path", "video_url")
_ALLOWED_SOURCES = (
    "allowed: a PIL image, a local path, a file:// URI, an http(s) URL, a data: URI, base64 text, bytes, "
    "or a content item with one of the keys image/url/path/image_url/video/base64"
)


def _fail(where: str | None, source: Any, what: str, allowed: str = _ALLOWED_SOURCES) -> MediaError:
    """Build a MediaError `<where>: <source>: <what>; <allowed>` (source shortened to 80 chars)."""
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    text = text if len(text) <= 80 else text[:60] + "..." + text[-12:]
    prefix = f"{where}: " if where else ""
    return MediaError(f"{prefix}{text!r}: {what}; {allowed}")


def source_from_item(item: Mapping[str, Any], keys: Sequence[str] = IMAGE_KEYS, *, where: str | None = None) -> Any:
    """The media source in a conversation content item (`{"type": "image", "image": ...}`, the OpenAI
    form `{"image_url": {"url": ...}}`, or `{"base64": ...}`)."""
    for key in keys:
        if key in item and item[key] is not None:
            value = item[key]
            if isinstance(value, Mapping):  # OpenAI style {"image_url": {"url": "..."}}
                value = value.get("url")
            if key == "base64" and isinstance(value, str) and not value.startswith("data:"):
                value = "data:;base64," + value
            return value
    raise _fail(where, item, f"content item has none of the keys {list(keys)}")


# --------------------------------------------------------------------------------------------------
# bytes from a source


def check_public_host(url: str, *, where: str | None = None) -> None:
    """SSRF guard: raise MediaError unless every address the URL's host resolves to is public
    (not loopback, private, link-local, reserved). A DNS answer may still change between this check
    and the connection; servers that need a hard guarantee should also filter egress."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError) as exc:
        raise _fail(where, url, f"host {host!r} cannot be resolved ({exc})", "check the URL") from exc
    for address in sorted(addresses):
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise _fail(where, url, f"host {host!r} resolves to the non-public address {address}",
                        "only public hosts are fetched when block_private_hosts=True")


class _BoundedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most `max_redirections` redirects, only to http(s) (and, if asked, public) targets."""

    def __init__(self, max_redirections: int, block_private_hosts: bool = False, where: str | None = None):
        self.max_redirections = max_redirections
        self.max_repeats = max_redirections
        self.block_private_hosts, self.where = block_private_hosts, where

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl!r}", headers, fp)
        if self.block_private_hosts:
            check_public_host(newurl, where=self.where)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    block_private_hosts: bool = False,
    where: str | None = None,
) -> bytes:
    """GET an http(s) URL with urllib: `timeout` seconds in all, at most `max_bytes` bytes and
    `max_redirects` redirects; `block_private_hosts` refuses hosts (also redirect targets) that
    resolve to loopback/private addresses (for servers). Any failure is a MediaError naming the URL."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise _fail(where, url, "unsupported URL scheme", "only http:// and https:// URLs are fetched")
    if block_private_hosts:
        check_public_host(url, where=where)
    logger.debug("fetching %s (timeout %.1f s, max %d bytes)", url, timeout, max_bytes)
    opener = urllib.request.build_opener(_BoundedRedirects(max_redirects, block_private_hosts, where))
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "qwen2vl"})
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise _fail(where, url, f"response is {int(length)} bytes", f"at most max_bytes={max_bytes} are read")
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise _fail(where, url, f"response exceeds {max_bytes} bytes", "raise max_bytes to allow it")
                if time.monotonic() > deadline:
                    raise _fail(where, url, f"download took longer than {timeout} s", "raise timeout to allow it")
                chunks.append(chunk)
            return b"".join(chunks)
    except MediaError:
        raise
    except urllib.error.HTTPError as exc:
        raise _fail(where, url, f"HTTP {exc.code} {exc.reason}", "the URL must return the media file") from exc
    except (TimeoutError, OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
            raise _fail(where, url, f"no answer within timeout={timeout} s", "raise timeout or check the server") from exc
        raise _fail(where, url, f"request failed ({reason})", "check the URL and the network") from exc


_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\r ")


def _decode_base64(text: str, where: str | None, source: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(where, source, "is neither an existing file, a URL, nor valid base64") from exc


def read_source(
    source: str | os.PathLike | bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    block_private_hosts: bool = False,
    where: str | None = None,
) -> bytes | Path:
    """Resolve a source to bytes (URL, data: URI, base64) or to a local Path (path, file:// URI)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise _fail(where, source, f"unsupported source type {type(source).__name__}")
    scheme = urllib.parse.urlsplit(source).scheme.lower() if "://" in source or source.startswith("data:") else ""
    if scheme in ("http", "https"):
        return fetch_url(source, timeout=timeout, max_bytes=max_bytes, max_redirects=max_redirects,
                         block_private_hosts=block_private_hosts, where=where)
    if scheme == "data":
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _fail(where, source, "data: URI is not base64-encoded", "use data:<mime>;base64,<payload>")
        return _decode_base64(payload, where, source)
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path))
    elif scheme:
        raise _fail(where, source, f"unsupported URL scheme {scheme!r}", "use http(s)://, file://, data: or a path")
    else:
        path = Path(source).expanduser()
    try:
        if path.is_file():
            return path
    except OSError:  # e.g. a base64 string longer than a file name may be
        pass
    # Not a file: the reference also accepts bare base64 text (no '.' or ':' can occur in it).
    if scheme == "" and len(source) >= 16 and _BASE64_CHARS.issuperset(source):
        return _decode_base64(source, where, source)
    raise _fail(where, source, "file not found", "give an existing file path, a URL or base64 data")


# --------------------------------------------------------------------------------------------------
# images


def convert_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image of any mode, as the reference's `convert_to_rgb`: images with an alpha
    band or a transparency key are composited on white; others use PIL's `convert("RGB")` (which, as
    in the reference, clips 16/32-bit modes such as I;16 to 0..255)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(
    data: bytes | Path,
    *,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    where: str | None = None,
    source: Any = None,
) -> Image.Image:
    """Decode image bytes or a file into an RGB PIL image with EXIF orientation applied. The header is
    read first and the pixel count checked against `max_image_pixels` BEFORE any pixel is decoded.
    Pillow refuses images above its own Image.MAX_IMAGE_PIXELS * 2 regardless (also a MediaError)."""
    source = str(data) if source is None and isinstance(data, Path) else source
    allowed = "give a PNG, JPEG, WebP, GIF, BMP or TIFF image file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)  # lazy: header only
    except Image.DecompressionBombError as exc:
        raise _fail(where, source, f"refused as a decompression bomb ({exc})", "the image is too large") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise _fail(where, source, f"is not a readable image ({type(exc).__name__}: {exc})", allowed) from exc
    width, height = image.size
    if width == 0 or height == 0:
        raise _fail(where, source, f"image is {width}x{height} px", "both sides must be at least 1 px")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise _fail(
            where, source, f"image is {width}x{height} = {width * height} px, refused before decoding",
            f"at most max_image_pixels={max_image_pixels} are allowed (decompression-bomb guard)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return convert_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _fail(where, source, f"image data is truncated or corrupt ({exc})", allowed) from exc


def array_to_pil(array: Any, *, where: str | None = None) -> Image.Image:
    """RGB PIL image from a uint8 numpy array / torch tensor (HW, HWC or CHW with 1, 3 or 4 channels)."""
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or arr.dtype != np.uint8:
        raise _fail(where, array, f"array of shape {arr.shape} and dtype {arr.dtype}",
                    "arrays must be uint8 HW, HWC or CHW with 1, 3 or 4 channels")
    return convert_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def load_image(
    source: Any,
    *,
    where: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    block_private_hosts: bool = False,
) -> Image.Image:
    """Any image source -> RGB PIL image. Sources decoded from bytes/paths/URLs get their EXIF
    orientation applied (as the reference does for string inputs); a PIL image passed in does not,
    it is only converted to RGB (alpha composited on white). `where` prefixes error messages."""
    if isinstance(source, Image.Image):
        if source.width == 0 or source.height == 0:
            raise _fail(where, source, f"image is {source.width}x{source.height} px", "both sides must be >= 1 px")
        return convert_rgb(source)
    if isinstance(source, Mapping):
        source = source_from_item(source, IMAGE_KEYS, where=where)
        if isinstance(source, Image.Image) or hasattr(source, "shape"):
            return load_image(source, where=where)
    if hasattr(source, "shape") and hasattr(source, "dtype"):
        return array_to_pil(source, where=where)
    data = read_source(source, timeout=timeout, max_bytes=max_bytes, max_redirects=max_redirects,
                       block_private_hosts=block_private_hosts, where=where)
    return open_image(data, max_image_pixels=max_image_pixels, where=where, source=source)


# --------------------------------------------------------------------------------------------------
# videos


@dataclass
class VideoMetadata:
    """What was decoded from one video: `frames_indices` used, their `timestamps` (seconds) and the
    `sampled_fps`; same field names as transformers' VideoMetadata."""

    total_num_frames: int
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    video_backend: str | None = None
    frames_indices: list[int] = field(default_factory=list)

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each used frame (index / fps); needs the source fps."""
        if not self.fps:
            raise MediaError("video metadata: fps is unknown, so timestamps cannot be computed; "
                             "pass video_metadata={'fps': ...} with array inputs")
        return [index / self.fps for index in self.frames_indices]

    @property
    def sampled_fps(self) -> float:
        """Effective frame rate of the used frames (the reference's formula; 24 when fps is unknown)."""
        if not self.fps or not self.total_num_frames or not self.frames_indices:
            return self.fps or 24
        return len(self.frames_indices) / self.total_num_frames * self.fps

    def __getitem__(self, key: str) -> Any:  # dict-style access, as transformers' Mapping
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return {"total_num_frames": self.total_num_frames, "fps": self.fps, "width": self.width,
                "height": self.height, "duration": self.duration, "video_backend": self.video_backend,
                "frames_indices": list(self.frames_indices)}


IndicesFn = Callable[[int, "float | None"], Sequence[int]]
_VIDEO_ALLOWED = "allowed: a video file (mp4, webm, mkv, avi, mov ...) as a path, file:// URI, http(s) URL or data: URI"


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise MissingDependencyError("video decoding needs PyAV; install it with `pip install qwen2vl[video]`") from exc
    return av


def decode_video(
    data: bytes | Path, indices_fn: IndicesFn | None = None, *, where: str | None = None, source: Any = None
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode a video file with PyAV -> (uint8 (T, H, W, 3) RGB frames, metadata). `indices_fn(total,
    fps)` picks the frames (all when None); frames equal torchcodec's for the same indices."""
    av = _import_av()
    source = str(data) if source is None else source
    try:
        with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
            if not container.streams.video:
                raise _fail(where, source, "contains no video stream", _VIDEO_ALLOWED)
            stream = container.streams.video[0]
            # count frames from the packets (as torchcodec's exact mode scans the file); header as fallback
            total = sum(1 for packet in container.demux(stream) if packet.size) or stream.frames
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            if total <= 0:
                raise _fail(where, source, "video has no frames", _VIDEO_ALLOWED)
            indices = [int(i) for i in (indices_fn(total, fps) if indices_fn else range(total))]
            frames = _decode_indices(container, stream, indices, where, source)
            meta = VideoMetadata(total_num_frames=int(total), fps=fps, width=stream.width, height=stream.height,
                                 duration=total / fps if fps else None, video_backend="pyav",
                                 frames_indices=indices)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise _fail(where, source, f"cannot be decoded as a video ({exc})", _VIDEO_ALLOWED) from exc
    return frames, meta


def _decode_indices(container: Any, stream: Any, indices: Sequence[int], where: str | None, source: Any) -> np.ndarray:
    """Decode sequentially from the start, keeping frames at `indices` (repeats allowed, any order)."""
    if not indices:
        raise _fail(where, source, "no frame was selected", "sample at least one frame")
    wanted = set(indices)
    last = max(indices)
    stream.thread_type = "AUTO"
    container.seek(0)
    kept: dict[int, np.ndarray] = {}
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            kept[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
            break
    missing = [i for i in indices if i not in kept]
    if missing:
        raise _fail(where, source, f"only {len(kept)} of the selected frames could be decoded "
                    f"(missing indices {missing[:5]})", "the file may be truncated; re-encode it")
    return np.stack([kept[i] for i in indices])


def load_video(
    source: Any,
    indices_fn: IndicesFn | None = None,
    *,
    where: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    block_private_hosts: bool = False,
) -> tuple[np.ndarray, VideoMetadata]:
    """A video path / file:// URI / http(s) URL / data: URI / bytes / content item -> (uint8 (T, H, W, 3),
    metadata), decoding only the frames `indices_fn(total_frames, fps)` selects."""
    if isinstance(source, Mapping):
        source = source_from_item(source, VIDEO_KEYS, where=where)
    data = read_source(source, timeout=timeout, max_bytes=max_bytes, max_redirects=max_redirects,
                       block_private_hosts=block_private_hosts, where=where)
    return decode_video(data, indices_fn, where=where, source=source)


def load_frames(frames: Sequence[Any], *, where: str | None = None, **image_options: Any) -> np.ndarray:
    """A list of frames (PIL images, arrays, image paths/URLs) -> uint8 (T, H, W, 3); sizes must agree."""
    arrays = [np.asarray(load_image(frame, where=f"{where or 'video'}[{i}]", **image_options))
              for i, frame in enumerate(frames)]
    if not arrays:
        raise _fail(where, frames, "video has no frames", "give at least one frame")
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise _fail(where, frames, f"frames have different sizes {shapes[:3]}", "all frames must share one size")
    return np.stack(arrays)

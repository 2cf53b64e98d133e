"""qwen2vl.processing.media: every image/video source kind, EXIF, RGB conversion and each bad input.

URLs are served by a small HTTP server on 127.0.0.1 started by the test (support/media.py).
"""

import base64
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from qwen2vl.errors import MediaError
from qwen2vl.processing import media
from support.media import make_video, serve_folder


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "photo.png")
    # a 40x30 JPEG whose EXIF says "rotate 90 degrees clockwise for display" (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(root / "rotated.jpg", exif=exif, quality=95)
    (root / "notimage.png").write_bytes(b"hello, this is text")
    (root / "truncated.png").write_bytes(_png(Image.fromarray(pixels))[:200])
    make_video(root / "clip.mp4", num_frames=8, fps=4, width=64, height=32)
    _write_audio_only(root / "audio.mp4")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 500)
    return root


def _write_audio_only(path):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


def test_local_sources_agree(folder):
    expected = np.asarray(Image.open(folder / "photo.png"))
    data = (folder / "photo.png").read_bytes()
    b64 = base64.b64encode(data).decode()
    sources = [str(folder / "photo.png"), folder / "photo.png", (folder / "photo.png").as_uri(), data,
               f"data:image/png;base64,{b64}", b64, {"type": "image", "image": str(folder / "photo.png")},
               {"image_url": {"url": f"data:image/png;base64,{b64}"}}, {"path": str(folder / "photo.png")},
               {"base64": b64}, {"url": (folder / "photo.png").as_uri()}]
    for source in sources:
        image = media.load_image(source)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_exif_applied_for_files_not_for_pil(folder):
    from_file = media.load_image(folder / "rotated.jpg")
    assert from_file.size == (30, 40)  # stored 40 wide x 30 high, displayed rotated
    raw = Image.open(folder / "rotated.jpg")
    assert media.load_image(raw).size == (40, 30)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "PA"])
def test_convert_rgb_every_mode(mode):
    rgba = Image.new("RGBA", (4, 2), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white after compositing
    if mode == "I;16":
        image = Image.fromarray(np.full((2, 4), 40, np.uint16))
    else:
        image = rgba.convert(mode) if mode != "RGBA" else rgba
    rgb = media.convert_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (4, 2)
    if mode in ("LA", "RGBA", "PA"):
        assert rgb.getpixel((0, 0)) == (255, 255, 255)
    if mode == "I;16":
        assert rgb.getpixel((1, 1)) == (40, 40, 40)


def test_transparency_key_composited_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    assert np.asarray(media.convert_rgb(image)).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_arrays_to_pil():
    chw = np.zeros((3, 5, 6), np.uint8)
    chw[0] = 9
    assert media.load_image(chw).getpixel((0, 0)) == (9, 0, 0)
    with pytest.raises(MediaError, match="uint8"):
        media.load_image(np.zeros((5, 6, 3), np.float32))


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.png", "file not found"), ("notimage.png", "not a readable image"),
     ("truncated.png", "truncated or corrupt")],
)
def test_bad_files(folder, name, message):
    with pytest.raises(MediaError, match=rf"^messages\[0\]\.content\[1\]: .*{name}.*{message}.*; "):
        media.load_image(str(folder / name), where="messages[0].content[1]")


def test_bad_sources():
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        media.load_image("ftp://example.com/a.png")
    with pytest.raises(MediaError, match="not base64-encoded"):
        media.load_image("data:image/png,abc")
    with pytest.raises(MediaError, match="neither an existing file"):
        media.load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError, match="none of the keys"):
        media.load_image({"type": "image"})
    with pytest.raises(MediaError, match="0x4 px"):
        media.load_image(Image.new("RGB", (0, 4)))
    with pytest.raises(MediaError, match="not a readable image"):
        media.load_image(b"\x89PNG but not really")


def test_decompression_bomb_refused_before_decoding():
    data = _png(Image.new("L", (300, 200)))
    with pytest.raises(MediaError, match=r"300x200 = 60000 px, refused before decoding.*max_image_pixels=50000"):
        media.load_image(data, max_image_pixels=50000)
    assert media.load_image(data, max_image_pixels=60000).size == (300, 200)
    # a header claiming 40000x40000 (1.6 Gpx) with almost no data: refused by the default limit
    header = bytearray(_png(Image.new("L", (1, 1))))
    header[16:24] = (40000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")  # IHDR checksum
    with pytest.raises(MediaError, match="40000x40000|decompression bomb"):
        media.load_image(bytes(header))


def test_urls(folder):
    expected = np.asarray(Image.open(folder / "photo.png"))
    with serve_folder(folder, slow_seconds=2.0) as base:
        np.testing.assert_array_equal(np.asarray(media.load_image(f"{base}/photo.png")), expected)
        np.testing.assert_array_equal(np.asarray(media.load_image(f"{base}/hop/3/photo.png")), expected)
        with pytest.raises(MediaError, match=r"^c\[0\]: .*HTTP 404"):
            media.load_image(f"{base}/nothing.png", where="c[0]")
        with pytest.raises(MediaError, match="timeout=0.3"):
            media.load_image(f"{base}/slow/photo.png", timeout=0.3)
        with pytest.raises(MediaError, match="HTTP 302"):
            media.load_image(f"{base}/loop")
        with pytest.raises(MediaError, match="HTTP 302"):
            media.load_image(f"{base}/hop/3/photo.png", max_redirects=2)
        with pytest.raises(MediaError, match="exceeds 100000 bytes"):
            media.fetch_url(f"{base}/huge", max_bytes=100_000)
        with pytest.raises(MediaError, match="response is .* bytes"):
            media.load_image(f"{base}/photo.png", max_bytes=100)
        frames, meta = media.load_video(f"{base}/clip.mp4")
        assert frames.shape == (8, 32, 64, 3) and meta.total_num_frames == 8


def test_private_hosts_blocked_on_request(folder):
    with serve_folder(folder) as base:
        assert media.load_image(f"{base}/photo.png").size == (40, 30)  # allowed by default
        with pytest.raises(MediaError, match="non-public address 127.0.0.1.*block_private_hosts=True"):
            media.load_image(f"{base}/photo.png", block_private_hosts=True)
        with pytest.raises(MediaError, match="non-public address"):
            media.load_video(f"{base}/clip.mp4", block_private_hosts=True)
    for url in ("http://10.1.2.3/a.png", "http://[::1]/a.png", "http://169.254.169.254/latest"):
        with pytest.raises(MediaError, match="non-public"):
            media.check_public_host(url)
    media.check_public_host("http://8.8.8.8/a.png")  # a public literal passes without DNS


def test_connection_refused():
    with serve_folder(".") as base:
        dead = base
    with pytest.raises(MediaError, match="request failed"):
        media.load_image(f"{dead}/photo.png", timeout=2)


def test_load_video_frames_and_metadata(folder):
    frames, meta = media.load_video(folder / "clip.mp4", lambda total, fps: [0, 3, 3, 7])
    assert frames.shape == (4, 32, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[1], frames[2])
    assert (meta.total_num_frames, meta.fps, meta.width, meta.height) == (8, 4.0, 64, 32)
    assert meta.frames_indices == [0, 3, 3, 7]
    assert meta.timestamps == [0.0, 0.75, 0.75, 1.75]
    assert meta.sampled_fps == 2.0 and meta["duration"] == 2.0
    all_frames, _ = media.load_video({"video": (folder / "clip.mp4").as_uri()})
    np.testing.assert_array_equal(all_frames[[0, 3, 7]], frames[[0, 1, 3]])


def test_bad_videos(folder):
    with pytest.raises(MediaError, match=r"^v\[0\]: .*broken\.mp4.*cannot be decoded"):
        media.load_video(folder / "broken.mp4", where="v[0]")
    with pytest.raises(MediaError, match="file not found"):
        media.load_video(folder / "nope.mp4")
    with pytest.raises(MediaError, match=r"missing indices \[8\]"):
        media.load_video(folder / "clip.mp4", lambda total, fps: [0, 8])
    truncated = (folder / "clip.mp4").read_bytes()
    with pytest.raises(MediaError, match="cannot be decoded|no frames|could be decoded"):
        media.load_video(truncated[: len(truncated) // 2])
    with pytest.raises(MediaError, match="contains no video stream"):
        media.load_video(folder / "audio.mp4")
    with pytest.raises(MediaError, match="different sizes"):
        media.load_frames([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])
    with pytest.raises(MediaError, match="no frames"):
        media.load_frames([])

"""Our video path against transformers 5.24 (`Qwen2VLVideoProcessor` + its torchcodec loader) on the
same files: identical frame indices and grids; pixels equal (<= 1e-5) on identical frames, and within
the decoder tolerance (PyAV vs torchcodec RGB, rarely +-2 levels) end to end."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as HFVideo
from transformers.video_utils import load_video as hf_load_video

from qwen2vl.processing.media import load_video
from qwen2vl.processing.video import Qwen2VLVideoProcessor, sample_frame_indices
from support.media import make_video

HUB = {"min_pixels": 3136, "max_pixels": 12845056}
SMALL = {"min_pixels": 3136, "max_pixels": 28 * 28 * 6}
# (frames, fps, width, height, codec): different lengths, rates (incl. NTSC 29.97) and sizes
VIDEOS = {
    "30f_10fps": (30, 10, 72, 52, "mpeg4"),
    "17f_7.5fps": (17, 7.5, 56, 84, "libx264"),
    "25f_ntsc": (25, Fraction(30000, 1001), 64, 48, "libx264"),
}
SAMPLING = [{}, {"fps": 1}, {"fps": 2}, {"num_frames": 6}, {"num_frames": 5}]
DECODE_ATOL = 2 / 255 / min(0.26862954, 0.26130258, 0.27577711) + 1e-6  # 2 grey levels, normalised


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {name: str(make_video(root / f"{name}.mp4", n, fps, w, h, codec)) for name, (n, fps, w, h, codec)
            in VIDEOS.items()}


def _reference(videos, bounds, **kwargs):
    if kwargs.get("fps") is not None or kwargs.get("num_frames") is not None:
        kwargs["do_sample_frames"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HFVideo(**bounds)(videos=videos, return_tensors="pt", return_metadata=True,
                                 cap_pixels_per_frame=kwargs.pop("cap_pixels_per_frame", False), **kwargs)


@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: "_".join(f"{k}{v}" for k, v in s.items()) or "all")
@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_files_end_to_end(files, name, sampling):
    expected = _reference(files[name], HUB, **sampling)
    got = Qwen2VLVideoProcessor(**HUB)(files[name], return_metadata=True, **sampling)
    assert got["video_grid_thw"].tolist() == expected["video_grid_thw"].tolist()
    ours, theirs = got["video_metadata"][0], expected["video_metadata"][0]
    assert ours.frames_indices == [int(i) for i in theirs.frames_indices]
    assert ours.total_num_frames == theirs.total_num_frames
    assert ours.fps == pytest.approx(theirs.fps, rel=1e-9)
    # the reference holds indices as an int tensor, so its timestamps are float32 values
    assert ours.timestamps == pytest.approx([float(t) for t in theirs.timestamps], rel=1e-6, abs=1e-7)
    assert ours.sampled_fps == pytest.approx(float(theirs.sampled_fps), rel=1e-6)
    diff = (got["pixel_values_videos"] - expected["pixel_values_videos"]).abs()
    assert diff.max() <= DECODE_ATOL and diff.mean() <= 1e-3


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_decoded_frames_match_torchcodec(files, name):
    theirs, meta = hf_load_video(files[name], backend="torchcodec")
    ours, our_meta = load_video(files[name])
    theirs = theirs.permute(0, 2, 3, 1).numpy()  # (T, C, H, W) -> (T, H, W, C)
    assert ours.shape == theirs.shape and our_meta.total_num_frames == meta.total_num_frames
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-3


@pytest.mark.parametrize("bounds", [HUB, SMALL], ids=["hub", "small_max"])
@pytest.mark.parametrize("sampling", SAMPLING[1:], ids=lambda s: "_".join(f"{k}{v}" for k, v in s.items()))
def test_identical_frames_give_identical_pixels(files, bounds, sampling):
    frames, _ = hf_load_video(files["30f_10fps"], backend="torchcodec")  # (T, C, H, W) uint8
    metadata = {"fps": 10.0, "total_num_frames": frames.shape[0]}
    expected = _reference(frames, bounds, video_metadata=metadata, **sampling)
    got = Qwen2VLVideoProcessor(**bounds)(frames, video_metadata=metadata, return_metadata=True, **sampling)
    assert got["video_grid_thw"].tolist() == expected["video_grid_thw"].tolist()
    assert got["video_metadata"][0].frames_indices == [int(i) for i in expected["video_metadata"][0].frames_indices]
    torch.testing.assert_close(got["pixel_values_videos"], expected["pixel_values_videos"], atol=1e-5, rtol=0)


def test_arrays_frame_lists_batches_and_cap():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (5, 50, 61, 3), dtype=np.uint8)  # odd T: last frame repeated
    b = rng.integers(0, 256, (4, 90, 40, 3), dtype=np.uint8)
    for videos in (a, [a, b], [Image.fromarray(f) for f in b]):
        expected = _reference(videos, HUB)
        got = Qwen2VLVideoProcessor(**HUB)(videos)
        assert got["video_grid_thw"].tolist() == expected["video_grid_thw"].tolist()
        torch.testing.assert_close(got["pixel_values_videos"], expected["pixel_values_videos"], atol=1e-5, rtol=0)
    expected = _reference(a, {"min_pixels": 3136, "max_pixels": 12845056}, cap_pixels_per_frame=True)
    got = Qwen2VLVideoProcessor(**HUB, cap_pixels_per_frame=True)(a)
    torch.testing.assert_close(got["pixel_values_videos"], expected["pixel_values_videos"], atol=1e-5, rtol=0)


def test_sample_frame_indices_equals_reference():
    proc = HFVideo()
    from transformers.video_utils import VideoMetadata

    for total in (1, 2, 7, 9, 17, 30, 31, 97, 300, 1001, 5000):
        for video_fps in (7.5, 23.976, 25.0, 30.0, 59.94):
            meta = VideoMetadata(total_num_frames=total, fps=video_fps)
            for kwargs in ({"fps": 0.5}, {"fps": 1}, {"fps": 2}, {"fps": 24}, {"num_frames": 4}, {"num_frames": 9}):
                try:
                    expected = [int(i) for i in proc.sample_frames(meta, **kwargs)]
                except (ValueError, ZeroDivisionError):
                    with pytest.raises(ValueError):
                        sample_frame_indices(total, video_fps, **kwargs)
                    continue
                assert sample_frame_indices(total, video_fps, **kwargs) == expected, (total, video_fps, kwargs)

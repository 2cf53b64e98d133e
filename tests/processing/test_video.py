"""qwen2vl.processing.video: frame sampling, temporal patch layout, processor options and metadata.

Expected values come from first principles or the worked examples of reference-notes §6.1.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.errors import ConfigError, MediaError
from qwen2vl.processing.video import (
    Qwen2VLVideoProcessor,
    flatten_videos,
    patchify_video,
    resize_frames,
    sample_frame_indices,
)
from support.media import make_video

HUB = {"min_pixels": 3136, "max_pixels": 12845056}


def test_sampling_worked_examples():
    assert sample_frame_indices(300, 30, fps=2) == list(range(0, 300, 15))
    assert sample_frame_indices(300, 30, num_frames=7) == [0, 37, 75, 112, 150, 187, 225, 262]
    assert sample_frame_indices(9, 30, fps=2) == [0, 2, 4, 6]  # min_frames=4 lifts 0.6 frames
    assert sample_frame_indices(5, 30) == [0, 1, 2, 3, 4]  # neither fps nor num_frames: every frame
    assert len(sample_frame_indices(3000, 30, fps=30, max_frames=768)) == 768
    assert sample_frame_indices(20, 10, fps=1, min_frames=1) == [0, 10]  # 2 s at 1 fps -> 2 frames


def test_sampling_matches_floor_formula():
    for total, n in [(17, 6), (100, 8), (31, 30), (7, 2)]:
        expected = [int(np.floor(np.float32(i * total / n))) for i in range(n)]
        assert sample_frame_indices(total, 25.0, num_frames=n) == expected


def test_sampling_errors():
    with pytest.raises(MediaError, match="fps=2 and num_frames=4; pass only one"):
        sample_frame_indices(10, 10, fps=2, num_frames=4)
    with pytest.raises(MediaError, match="frame rate, which is unknown"):
        sample_frame_indices(10, None, fps=2)
    with pytest.raises(MediaError, match=r"v\[2\]: sampling asks for 12 frames of a 10-frame video"):
        sample_frame_indices(10, 10, num_frames=12, where="v[2]")
    with pytest.raises(MediaError, match="asks for 0 frames"):
        sample_frame_indices(10, 10, num_frames=1)
    with pytest.raises(MediaError, match="asks for 0 frames"):  # 1 frame floors to 0 (the reference divides by 0)
        sample_frame_indices(10, 10, fps=1, min_frames=1)


def test_patchify_video_layout_and_odd_padding():
    t, h, w = 3, 28, 56
    # value = frame * 1000 + row * 100... encode (frame, y, x) in the first channel
    frames = torch.zeros(t, 3, h, w)
    for f in range(t):
        frames[f, 0] = f * 10000 + torch.arange(h)[:, None] * 100 + torch.arange(w)[None, :]
    rows, grid = patchify_video(frames)
    assert grid == (2, 2, 4) and rows.shape == (16, 1176)
    cols = rows.view(16, 3, 2, 14, 14)  # (N, C, T, ph, pw)
    # row 0: block (0,0) of frames 0/1; row 1: patch (0,1); row 4: block (0,1) starts at x=28
    assert cols[0, 0, 0, 0, 0] == 0 and cols[0, 0, 1, 0, 0] == 10000
    assert cols[1, 0, 0, 0, 0] == 14 and cols[2, 0, 0, 0, 0] == 1400 and cols[4, 0, 0, 0, 0] == 28
    # the odd third frame is repeated: temporal group 1 holds frames 2 and 2
    assert cols[8, 0, 0, 0, 0] == 20000 and cols[8, 0, 1, 0, 0] == 20000


def test_resize_frames_is_antialiased_bicubic_on_uint8():
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 40, 60), dtype=np.uint8))
    assert resize_frames(noise, 40, 60) is noise  # no-op at the same size
    assert resize_frames(noise, 28, 56).dtype == torch.uint8
    # on smooth content the uint8 kernel agrees with float antialiased bicubic up to rounding
    y, x = torch.meshgrid(torch.arange(40), torch.arange(60), indexing="ij")
    smooth = ((y * 3 + x * 2) % 256).to(torch.uint8).expand(1, 3, 40, 60).contiguous()
    expected = torch.nn.functional.interpolate(smooth.float(), size=(28, 56), mode="bicubic",
                                               antialias=True, align_corners=False)
    assert (resize_frames(smooth, 28, 56).float() - expected).abs().max() <= 1


def test_processor_on_arrays_with_metadata():
    video = np.random.default_rng(0).integers(0, 256, (10, 56, 84, 3), dtype=np.uint8)
    proc = Qwen2VLVideoProcessor(**HUB)
    out = proc(video, fps=2, video_metadata={"fps": 5.0}, return_metadata=True)
    meta = out["video_metadata"][0]
    assert meta.frames_indices == [0, 2, 5, 7]  # 10 frames at 5 fps, 2 fps -> 4 frames
    assert meta.timestamps == [0.0, 0.4, 1.0, 1.4] and meta.sampled_fps == 2.0
    assert out.video_grid_thw.tolist() == [[2, 4, 6]]  # BatchFeature: attribute access
    plain = proc(video[[0, 2, 5, 7]])
    torch.testing.assert_close(out["pixel_values_videos"], plain["pixel_values_videos"], rtol=0, atol=0)
    chw = proc(torch.from_numpy(video).permute(0, 3, 1, 2), return_tensors="np")
    np.testing.assert_array_equal(chw["pixel_values_videos"], proc(video)["pixel_values_videos"].numpy())
    # without fps/num_frames every frame is used (5 temporal groups)
    assert proc(video)["video_grid_thw"].tolist() == [[5, 4, 6]]


def test_processor_frames_lists_and_batches():
    frames = [Image.new("RGB", (56, 56), (i * 20, 0, 0)) for i in range(3)]
    proc = Qwen2VLVideoProcessor(**HUB)
    out = proc([frames, np.zeros((2, 28, 28, 3), np.uint8)], return_metadata=True)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 4]]  # 28x28 is lifted to 56x56
    assert out["video_metadata"][0].frames_indices == [0, 1, 2]
    with pytest.raises(MediaError, match="list of frames cannot be sampled"):
        proc(frames, num_frames=2)
    assert len(flatten_videos(["a.mp4", "b.mp4"])) == 2
    assert len(flatten_videos([["f1.png", "f2.png"]])) == 1
    assert len(flatten_videos(frames)) == 1


def test_per_video_sizes_and_cap(tmp_path):
    video = np.zeros((4, 280, 420, 3), np.uint8)
    proc = Qwen2VLVideoProcessor(**HUB)
    out = proc([video, video], sizes=[{"max_pixels": 28 * 28 * 16}, {"resized_height": 56, "resized_width": 112}])
    assert out["video_grid_thw"].tolist() == [[2, 6, 8], [2, 4, 8]]  # 280x420 at 12544 px -> 84x112
    # cap: max_pixels = max(min(longest, int(128000*28*28*0.9)*2 // T), int(shortest*1.05))
    capped = Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056, cap_pixels_per_frame=True,
                                   max_video_tokens=100)
    limit = max(min(12845056, int(100 * 784 * 0.9) * 2 // 4), int(3136 * 1.05))
    grid = capped(video)["video_grid_thw"][0].tolist()
    assert grid[1] * grid[2] * 196 <= limit


def test_video_file_and_item_overrides(tmp_path):
    path = make_video(tmp_path / "c.mp4", num_frames=12, fps=6, width=64, height=32)
    proc = Qwen2VLVideoProcessor(**HUB)
    out = proc({"type": "video", "video": str(path)}, sizes=[{"fps": 1.0}], return_metadata=True)
    assert out["video_metadata"][0].frames_indices == [0, 3, 6, 9]  # 2 s at 1 fps -> min_frames 4
    assert out["video_metadata"][0].video_backend == "pyav"
    with pytest.raises(MediaError, match=r"^clip: .*c\.mp4.*cannot be decoded|^clip: .*asks for"):
        proc(str(path), num_frames=40, where="clip")


def test_config_files(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**HUB, "merge_size": 2}))
    proc = Qwen2VLVideoProcessor.from_pretrained(tmp_path)
    assert proc.size == {"shortest_edge": 3136, "longest_edge": 12845056}  # falls back to the image file
    assert Qwen2VLVideoProcessor().size == {"shortest_edge": 100352, "longest_edge": 602112}
    saved = Qwen2VLVideoProcessor.from_pretrained(tmp_path, max_pixels=50176).save_pretrained(tmp_path)
    assert saved.name == "video_preprocessor_config.json"
    again = Qwen2VLVideoProcessor.from_pretrained(tmp_path)
    assert again.max_pixels == 50176 and again.to_dict()["video_processor_type"] == "Qwen2VLVideoProcessor"
    with pytest.raises(ConfigError, match="unknown options"):
        proc(np.zeros((2, 28, 28, 3), np.uint8), nframes=3)

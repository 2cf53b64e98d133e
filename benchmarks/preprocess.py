"""Preprocessing throughput: our image/video processors vs transformers 5.24's on the same inputs.

Runs every implementation in ONE process, interleaved round by round (fine for CPU-bound
preprocessing: no caches or compiled state carry over), and reports medians.

    python benchmarks/preprocess.py --rounds 15
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import numpy as np
import torch
from PIL import Image

HUB = {"min_pixels": 3136, "max_pixels": 12845056}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like RGB image: smooth gradients, a few shapes, mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 200 + 30, y / height * 180 + 40, (np.sin(x / 37) + np.cos(y / 23)) * 60 + 120], -1)
    for _ in range(12):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(20, 160)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    image += rng.normal(0, 4, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_rounds(impls: dict, rounds: int) -> dict[str, list[float]]:
    """Call each implementation once per round, in interleaved order; seconds per call."""
    times = {name: [] for name in impls}
    for name, fn in impls.items():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in impls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def image_bench(rounds: int) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as HFTorchvision

    from qwen2vl.processing.image import Qwen2VLImageProcessor

    image = photo(1280, 960)
    ours, hf_pil, hf_tv = Qwen2VLImageProcessor(**HUB), Qwen2VLImageProcessorPil(**HUB), HFTorchvision(**HUB)
    impls = {
        "qwen2vl (PIL bicubic)": lambda: ours(image, return_tensors="pt"),
        "transformers Qwen2VLImageProcessorPil": lambda: hf_pil(image, return_tensors="pt"),
        "transformers Qwen2VLImageProcessor (torchvision)": lambda: hf_tv(image, return_tensors="pt"),
    }
    a, b = impls["qwen2vl (PIL bicubic)"](), impls["transformers Qwen2VLImageProcessorPil"]()
    diff = (a["pixel_values"] - b["pixel_values"]).abs().max().item()
    grid = a["image_grid_thw"].tolist()
    report(f"image 1280x960 photo-like, hub bounds, grid {grid}; max |ours - PIL ref| = {diff:.1e}",
           time_rounds(impls, rounds), unit="images/s")


def video_bench(rounds: int) -> None:
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as HFVideo

    from qwen2vl.processing.video import Qwen2VLVideoProcessor

    frames = np.stack([np.asarray(photo(640, 360, seed)) for seed in range(16)])  # (16, 360, 640, 3)
    ours, hf = Qwen2VLVideoProcessor(**HUB), HFVideo(**HUB)
    impls = {
        "qwen2vl": lambda: ours(frames),
        "transformers Qwen2VLVideoProcessor": lambda: hf(videos=frames, return_tensors="pt",
                                                         cap_pixels_per_frame=False),
    }
    a, b = impls["qwen2vl"](), impls["transformers Qwen2VLVideoProcessor"]()
    diff = (a["pixel_values_videos"] - b["pixel_values_videos"]).abs().max().item()
    report(f"video 16 frames 640x360 (array input, no decode), hub bounds, grid {a['video_grid_thw'].tolist()}; "
           f"max |ours - ref| = {diff:.1e}", time_rounds(impls, rounds), unit="videos/s")


def report(title: str, times: dict[str, list[float]], unit: str) -> None:
    print(f"\n{title}")
    print(f"| implementation | median ms | {unit} | vs first |")
    print("|---|---:|---:|---:|")
    first = None
    for name, values in times.items():
        median = statistics.median(values)
        first = first or median
        print(f"| {name} | {median * 1e3:.1f} | {1 / median:.1f} | {median / first:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-video", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import transformers

    print(f"CPU: {cpu_model()}; cores visible: {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"transformers {transformers.__version__}; Pillow {Image.__version__}; numpy {np.__version__}")
    image_bench(args.rounds)
    if not args.no_video:
        video_bench(args.rounds)


if __name__ == "__main__":
    main()

"""Peak host memory of `from_pretrained` vs the checkpoint's weight bytes (target <= 1.3x).

    python benchmarks/load_memory.py [--shape 2b] [--dir /tmp/qwen2vl-load-mem] [--keep]

1. Writer: builds the model on the meta device, `to_empty` (one copy of the weights, uninitialised),
   fills each tensor by tiling a small random block (cheap), and streams it to bf16 safetensors
   shards with our `save_pretrained` (no second copy). Its peak RSS is reported too.
2. Loader, in a FRESH subprocess: `from_pretrained(dir)` (dtype "auto" -> bf16), then touches every
   parameter (a sum per tensor) so that every mmap'd page is resident, and reports ru_maxrss.
The ratio is peak RSS / weight bytes; the process baseline (python + torch) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

LOADER = r"""
import json, resource, sys, time
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration
t0 = time.perf_counter()
model = Qwen2VLForConditionalGeneration.from_pretrained(sys.argv[1])
load_s = time.perf_counter() - t0
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.no_grad():
    checksum = sum(float(p.float().sum()) if p.numel() < 2**24 else float(p.sum()) for p in model.parameters())
touched = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"baseline_rss": base, "rss_after_load": after_load, "rss_after_touch": touched,
                  "weight_bytes": weights, "dtype": str(model.dtype), "load_s": round(load_s, 2),
                  "finite": checksum == checksum}))
"""


def write_checkpoint(shape: str, folder: Path, shard: str) -> dict:
    import torch

    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig.preset(shape)
    torch.set_default_dtype(torch.bfloat16)  # parameters are created bf16 on meta ...
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")  # ... and allocated once, uninitialised, here
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            flat = tensor.view(-1)
            for start in range(0, flat.numel(), block.numel()):  # tile the block: memcpy speed
                n = min(block.numel(), flat.numel() - start)
                flat[start:start + n].copy_(block[:n])
        model.tie_weights()
        model.save_pretrained(folder, max_shard_size=shard)
    return {"write_s": round(time.perf_counter() - t0, 1),
            "writer_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "files": sorted(p.name for p in folder.glob("*.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2b", choices=["2b", "7b", "72b"])
    parser.add_argument("--dir", default="/tmp/qwen2vl-load-mem")
    parser.add_argument("--shard", default="2GB")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    args = parser.parse_args()
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        # the writer runs in its own process too, so the loader's numbers cannot include it
        code = ("import json, sys; sys.path.insert(0, %r); sys.argv = ['x']; from pathlib import Path; "
                "import load_memory as m; print(json.dumps(m.write_checkpoint(%r, Path(%r), %r)))"
                % (str(Path(__file__).parent), args.shape, str(folder), args.shard))
        env = {"PYTHONPATH": str(SRC)}
        writer = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                           env={**_env(), **env}).stdout.strip().splitlines()[-1])
        loader = json.loads(subprocess.run([sys.executable, "-c", LOADER, str(folder)], check=True,
                                           capture_output=True, text=True, env={**_env(), **env}).stdout)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    gb = 1e9
    w = loader["weight_bytes"]
    print(f"shape {args.shape}: {w / gb:.2f} GB of {loader['dtype']} weights in {writer['files']}")
    print(f"writer: peak RSS {writer['writer_peak_rss'] / gb:.2f} GB ({writer['writer_peak_rss'] / w:.2f}x), "
          f"fill+save {writer['write_s']} s")
    print(f"loader: baseline {loader['baseline_rss'] / gb:.2f} GB, after from_pretrained "
          f"{loader['rss_after_load'] / gb:.2f} GB ({loader['load_s']} s), after touching every weight "
          f"{loader['rss_after_touch'] / gb:.2f} GB")
    print(f"peak RSS / weight bytes = {loader['rss_after_touch'] / w:.3f} (target <= 1.3)")


def _env() -> dict:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    main()

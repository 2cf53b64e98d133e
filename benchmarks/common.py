"""Shared plumbing for the benchmarks: checkpoint cache, fresh-process children, medians, tables.

Every measurement runs in its own child process (`python benchmarks/<script>.py --child ...`) that
prints one JSON line; the parent alternates implementations and reports medians and ratios.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench"  # gitignored cache of random-weight checkpoints and inputs
RESULT_PREFIX = "BENCH_RESULT "
IMPLS = ("ours", "hf")


def checkpoint_dir(shape: str) -> Path:
    """Path of the cached random-weight checkpoint for a shape, creating it on first use."""
    path = BENCH_DIR / f"qwen2vl-{shape}-random-bf16"
    if not (path / "model.safetensors.index.json").exists():
        cmd = [sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), "--shape", shape,
               "--out", str(path)]
        print(f"[bench] creating {path} ...", flush=True)
        subprocess.run(cmd, check=True)
    return path


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    """Child side: print the one result line the parent parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], timeout: float = 3600.0) -> dict:
    """Run `python benchmarks/<script> --child <args>` in a fresh process and parse its result line."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--child", *args]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT / "src"))
    env["TOKENIZERS_PARALLELISM"] = "false"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"child {' '.join(cmd)} failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def interleaved(runs: int, measure, variants: list[str] | tuple[str, ...] = IMPLS) -> dict[str, list[dict]]:
    """Call measure(variant) runs times per variant, alternating them and rotating the order every
    round (a,b,c / b,c,a / ...) so that drift in machine load hits every variant alike."""
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(runs):
        k = i % len(variants)
        for variant in list(variants[k:]) + list(variants[:k]):
            t0 = time.perf_counter()
            res = measure(variant)
            results[variant].append(res)
            print(f"[bench] round {i + 1}/{runs} {variant}: {_short(res)} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return results


def _short(res: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float))


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict:
    """CPU model, core count, torch/transformers versions and the date, for docs/benchmarks.md."""
    import torch

    model = platform.processor() or "unknown"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                wanted = ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx2")
                flags = " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
    except OSError:
        pass
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    return {
        "cpu": model, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": hf_version, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def bandwidth(threads: int = 0, gib: float = 1.0) -> dict:
    """Memory ceilings for decode: copy GB/s (read + write) and the GB/s of weights that bf16 and int8
    matrix-vector products (1 row, 2B-decoder shapes, 1 GiB of distinct matrices) achieve."""
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    n = int(gib * 2**30)
    src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    out = {"threads": torch.get_num_threads(), "copy_GBps": 2 * n / _best(lambda: dst.copy_(src)) / 1e9}
    del src, dst
    count = max(1, n // (2 * 8960 * 1536))
    weights = [torch.randn(8960, 1536).to(torch.bfloat16) for _ in range(count)]
    x = torch.randn(1, 1536).to(torch.bfloat16)
    total = count * 8960 * 1536
    out["bf16_linear_GBps"] = 2 * total / _best(lambda: [F.linear(x, w) for w in weights]) / 1e9
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    run = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]  # noqa: E731
    out["bf16_packed_GBps"] = 2 * total / _best(run) / 1e9
    del packed
    q = [w.to(torch.int8) for w in weights]
    s = torch.ones(8960, dtype=torch.bfloat16)
    out["int8pack_GBps"] = total / _best(lambda: [torch.ops.aten._weight_int8pack_mm(x, w, s) for w in q]) / 1e9
    return out


def _best(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":  # python benchmarks/common.py [threads]: machine info and memory ceilings
    print(machine_info())
    print(bandwidth(int(sys.argv[1]) if len(sys.argv) > 1 else 0))

"""Generation benchmark: qwen2vl vs transformers on one random-weight checkpoint, fresh processes.

    python benchmarks/generation.py --shape 2b --batch 1 8 --runs 3 [--int8]

Workload: one 640x480 image + a short prompt per row (batch 8 = 8 different images, same prompt),
64 new tokens, greedy, eos ignored. Both implementations get the SAME input tensors (made once by
transformers' processor from the checkpoint's files); only `model.generate` is timed. Timestamps come
from a streamer's put() (called by both with the prompt, then once per step): TTFT = call start to
first token (vision tower + prefill + first pick), decode tok/s = (new - 1) / (last token - first token).
Greedy ids must agree between implementations (int8: agreement is reported, not required).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")
WARMUP_IDS = [151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198]


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(ckpt: Path, batch: int) -> Path:
    """Processor outputs for `batch` rows (seeded 640x480 noise images), saved once under .bench/."""
    import numpy as np
    import torch
    from PIL import Image

    path = common.BENCH_DIR / f"inputs-640x480-b{batch}.pt"
    if path.exists():
        return path
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(ckpt))
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (480, 640, 3), dtype=np.uint8))
              for i in range(batch)]
    inputs = processor(images=images, text=[PROMPT] * batch, return_tensors="pt")
    torch.save({k: v for k, v in inputs.items()}, path)
    return path


# ---------------------------------------------------------------------------------------------- child
class TimingStreamer:
    """put()/end() receiver that only timestamps (wall and process CPU): the prompt put first, then
    one put per step. With a profiler, profiles from the first token to the end (the decode steps)."""

    def __init__(self, profiler=None) -> None:
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self.seen_prompt = False
        self.profiler = profiler

    def put(self, value) -> None:
        if not self.seen_prompt:  # both implementations put the prompt ids first
            self.seen_prompt = True
            return
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        if self.profiler is not None and len(self.stamps) == 1:
            self.profiler.start()

    def end(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()


# leaf-op name fragments -> category, for the decode profile (first match wins)
CATEGORIES = [("matmul", ("mm", "linear_pointwise", "int8pack", "addmm", "bmm", "linear")),
              ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
              ("copy/cat/index", ("copy", "cat", "index", "slice_scatter", "clone", "contiguous", "to")),
              ("elementwise", ("mul", "add", "pow", "mean", "rsqrt", "neg", "silu", "sigmoid", "sub", "div",
                               "where", "masked", "argmax", "cumsum", "eq", "ne", "lt", "gt", "le", "ge"))]


def profile_summary(prof, steps: int, wall_s: float) -> dict:
    """Self CPU time per decode step by category; 'overhead' is wall time not inside any op (Python,
    dispatcher, allocator)."""
    totals: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        self_us = ev.self_cpu_time_total
        name = ev.key.split("::")[-1]
        cat = next((c for c, frags in CATEGORIES if any(f in name for f in frags)), "other ops")
        totals[cat] = totals.get(cat, 0.0) + self_us
        top.append((self_us, ev.key, ev.count))
    per_step = {f"prof_{k}_ms": v / 1e3 / steps for k, v in totals.items()}
    per_step["prof_overhead_ms"] = wall_s * 1e3 / steps - sum(per_step.values())
    per_step["prof_top_ops"] = [f"{k} x{c // steps}/step {us / 1e3 / steps:.2f} ms"
                                for us, k, c in sorted(top, reverse=True)[:12]]
    return per_step


def load_model(impl: str, ckpt: Path, mode: str):
    import torch

    if impl == "hf":
        from transformers import Qwen2VLForConditionalGeneration
    else:
        from qwen2vl import Qwen2VLForConditionalGeneration
    extra = {"cpu_prepack": False} if impl == "ours" and mode == "unpacked" else {}
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.bfloat16,
                                                            attn_implementation="sdpa", **extra)
    model.eval()
    if impl == "ours" and mode == "int8":
        from qwen2vl.quantize import quantize_int8
        quantize_int8(model)  # text decoder + lm_head; the vision tower stays prepacked bf16
    return model


def decode_weight_bytes(model) -> int:
    """Bytes of matmul weights one decode step reads: text-decoder projections + lm_head."""
    from torch import nn

    total = 0
    for name, module in model.named_modules():
        if "visual" in name.split("."):
            continue
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif hasattr(module, "weight_int8"):  # qwen2vl.quantize.Int8Linear (+ bf16 scales)
            total += module.weight_int8.numel() + 2 * module.out_features
    return total


def int8_logit_error(model, ckpt: Path) -> dict:
    """Quantise in place and compare text-only logits (all positions of a short prompt) to bf16."""
    import torch
    from qwen2vl.quantize import quantize_int8

    ids = torch.tensor([WARMUP_IDS])
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        quantize_int8(model)
        got = model(input_ids=ids).logits.float()
    diff = (got - ref).abs()
    return {"int8_max_abs_logit_err": diff.max().item(), "int8_mean_abs_logit_err": diff.mean().item(),
            "bf16_logit_std": ref.std().item(),
            "int8_top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.logit_check:  # a separate process: the bf16 forward would inflate the timed runs' peak RSS
        return common.emit(int8_logit_error(load_model(args.impl, args.ckpt, "bf16"), args.ckpt))
    inputs = torch.load(args.inputs)
    t0 = time.perf_counter()
    mode = args.mode
    extra = {}
    model = load_model(args.impl, args.ckpt, mode)
    load_s = time.perf_counter() - t0
    gen_kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():  # warm-up: a short text-only prompt, 2 tokens (kernels, allocator, lazy init)
        model.generate(input_ids=torch.tensor([WARMUP_IDS]), max_new_tokens=2, **gen_kwargs)
        profiler = None
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            profiler = profile(activities=[ProfilerActivity.CPU])
        streamer = TimingStreamer(profiler)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, streamer=streamer, **gen_kwargs)
        end = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1]:]
    if new.shape[1] != args.new_tokens or len(streamer.stamps) != args.new_tokens:
        raise SystemExit(f"{args.impl}: generated {new.shape[1]} tokens ({len(streamer.stamps)} streamed), "
                         f"expected {args.new_tokens}: eos was not ignored")
    first, last = streamer.stamps[0], streamer.stamps[-1]
    extra["decode_weight_gb"] = decode_weight_bytes(model) / 1e9
    if profiler is not None:
        extra.update(profile_summary(profiler, args.new_tokens - 1, last - first))
    common.emit({
        "impl": args.impl, "mode": mode, "batch": int(new.shape[0]), "load_s": load_s,
        "ttft_s": first - start, "decode_tok_s": (args.new_tokens - 1) / (last - first),
        "decode_ms_per_step": 1e3 * (last - first) / (args.new_tokens - 1), "total_s": end - start,
        "decode_cpu_ms_per_step": 1e3 * (streamer.cpu_stamps[-1] - streamer.cpu_stamps[0]) / (args.new_tokens - 1),
        "peak_rss_mb": common.peak_rss_mb(), "ids": new.tolist(),
        "ids_sha": hashlib.sha1(str(new.tolist()).encode()).hexdigest()[:12], **extra,
    })


# ---------------------------------------------------------------------------------------------- parent
METRICS = [("ttft_s", "TTFT s", "{:.2f}", False), ("decode_tok_s", "decode tok/s (per row)", "{:.2f}", True),
           ("total_s", "total s", "{:.2f}", False), ("peak_rss_mb", "peak RSS MiB", "{:.0f}", False)]


def check_ids(results: dict[str, list[dict]], strict: list[str], allow_mismatch: bool) -> list[str]:
    """Greedy ids must be identical across every run of the strict impls; returns notes for the rest."""
    ref = results["hf"][0]["ids"]
    notes = []
    for impl in strict + ["hf"]:
        for r in results[impl]:
            if r["ids"] != ref:
                steps = [_agree_prefix(a, b) for a, b in zip(r["ids"], ref)]
                msg = (f"greedy ids differ: {impl} vs hf (rows agree for the first {min(steps)}..{max(steps)} "
                       f"of {len(ref[0])} tokens)")
                if not allow_mismatch:
                    raise SystemExit(msg + "; no timing reported (--allow-id-mismatch prints it anyway)")
                notes.append("UNVERIFIED: " + msg)
                break
    for impl, runs in results.items():
        if impl in strict or impl == "hf":
            continue
        rows = [_agree_prefix(a, b) for a, b in zip(runs[0]["ids"], ref)]
        notes.append(f"{impl}: greedy ids equal to hf bf16 for the first {min(rows)}..{max(rows)} of "
                     f"{len(ref[0])} tokens per row")
    return notes


def _flat(ids: list[list[int]]) -> list[int]:
    return [t for row in ids for t in row]


def _agree_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and a[n] == b[n]:
        n += 1
    return n


def report(batch: int, results: dict[str, list[dict]]) -> str:
    impls = list(results)
    header = ["batch", "metric"] + impls + [f"{i}/hf" for i in impls if i != "hf"]
    rows = []
    for key, label, fmt, _higher_better in METRICS:
        med = {i: common.median(results[i], key) for i in impls}
        rows.append([str(batch), label] + [fmt.format(med[i]) for i in impls]
                    + [f"{med[i] / med['hf']:.2f}x" for i in impls if i != "hf"])
    return common.table(rows, header)


def text_inputs() -> Path:
    """A 14-token text-only prompt (for decode profiles: a cheap prefill, the same decode work)."""
    import torch

    path = common.BENCH_DIR / "inputs-text-b1.pt"
    ids = torch.tensor([WARMUP_IDS])
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, path)
    return path


def child_args(variant: str, ckpt: Path, inputs: Path, new_tokens: int, *extra: str) -> list[str]:
    impl, _, mode = variant.partition("-")
    return ["--impl", impl, "--mode", mode or "bf16", "--ckpt", str(ckpt), "--inputs", str(inputs),
            "--new-tokens", str(new_tokens), *extra]


def run_batch(args: argparse.Namespace, ckpt: Path, batch: int, variants: list[str]) -> None:
    inputs = make_inputs(ckpt, batch)
    results = common.interleaved(args.runs, lambda v: common.run_child(
        "generation.py", child_args(v, ckpt, inputs, args.new_tokens, "--threads", str(args.threads))), variants)
    strict = [v for v in variants if v != "hf" and not v.endswith("int8")]
    notes = check_ids(results, strict, args.allow_id_mismatch)
    print(f"\n## {args.shape} batch {batch}, {args.new_tokens} new tokens, median of {args.runs} runs")
    print(report(batch, results))
    for v in variants:
        gb = results[v][0]["decode_weight_gb"]
        print(f"- {v}: decode reads {gb:.2f} GB of weights per step -> "
              f"{gb * common.median(results[v], 'decode_tok_s'):.1f} GB/s effective")
    for note in notes:
        print(f"- {note}")
    if "ours-int8" in variants and batch == args.batch[0]:
        check = common.run_child("generation.py", ["--impl", "ours", "--ckpt", str(ckpt), "--logit-check"])
        print(f"- int8 logits vs bf16 (14-token text prompt, all positions): {check}")


def run_profiles(args: argparse.Namespace, ckpt: Path, variants: list[str]) -> None:
    """One profiled child per variant: batch 1, text-only prompt, decode steps only."""
    inputs = text_inputs()
    rows = []
    for v in variants:
        r = common.run_child("generation.py", child_args(v, ckpt, inputs, args.new_tokens, "--profile", "--threads",
                                                                 str(args.threads)))
        cats = {k[5:-3]: r[k] for k in r if k.startswith("prof_") and k.endswith("_ms")}
        step = r["decode_ms_per_step"]
        rows.append([v, f"{step:.1f}"] + [f"{cats.get(c, 0.0):.1f}" for c in PROFILE_COLUMNS]
                    + [f"{r['decode_weight_gb'] / (cats.get('matmul', 0.0) / 1e3):.1f}",
                       f"{r['decode_weight_gb'] / (step / 1e3):.1f}"])
        print(f"[bench] {v} top ops: " + "; ".join(r["prof_top_ops"]), flush=True)
    print(f"\n## decode profile, {args.shape}, batch 1, text prompt, ms per step (profiler on)")
    print(common.table(rows, ["variant", "step ms"] + PROFILE_COLUMNS + ["GB/s in matmuls", "GB/s overall"]))


MODES = ("bf16", "unpacked", "int8")
PROFILE_COLUMNS = ["matmul", "attention", "elementwise", "copy/cat/index", "other ops", "overhead"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=common.IMPLS)
    parser.add_argument("--mode", choices=MODES, default="bf16")
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--inputs", type=Path)
    parser.add_argument("--shape", default="2b", help="2b | 7b | mini | tiny (the last two: smoke tests)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["bf16", "int8"], choices=MODES,
                        help="our variants next to transformers' bf16: bf16 = from_pretrained as is (CPU-prepacked), "
                             "unpacked = cpu_prepack=False, int8 = qwen2vl.quantize.quantize_int8")
    parser.add_argument("--profile-only", action="store_true", help="decode profiles instead of timings")
    parser.add_argument("--allow-id-mismatch", action="store_true",
                        help="report timings even when greedy ids differ (marked UNVERIFIED)")
    parser.add_argument("--logit-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the children (0 = torch default)")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    ckpt = common.checkpoint_dir(args.shape)
    print(f"[bench] machine: {common.machine_info()}")
    variants = ["hf"] + [f"ours-{m}" if m != "bf16" else "ours" for m in args.modes]
    if args.profile_only:
        return run_profiles(args, ckpt, variants)
    for batch in args.batch:
        run_batch(args, ckpt, batch, variants)


if __name__ == "__main__":
    main()

"""The `qwen2vl` command: run / chat / batch / info. Owns stdout and stderr; imported by nothing.

Errors print one line (`error: ...`) on stderr and exit 1 (2 for usage errors, 130 on Ctrl-C);
`--debug` adds the traceback and debug logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from qwen2vl import batch as jobs
from qwen2vl.errors import CheckpointError, MediaError, Qwen2VLError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DEFAULT_MAX_NEW_TOKENS = 256
CHAT_HELP = """commands:
  /image PATH   attach an image to your next message
  /video PATH   attach a video to your next message
  /reset        forget the conversation and pending attachments
  /quit         leave (also /exit or end of input)
  /help         this text
anything else is sent as your message; replies are kept in the conversation."""


# --------------------------------------------------------------------------- arguments


class UsageError(Qwen2VLError):
    """Flags that do not fit together; exits 2 like argparse's own usage errors."""


def _common() -> argparse.ArgumentParser:
    """Flags every subcommand shares (model loading, logging)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint folder or hub id (default: the built-in model)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = bfloat16 on CUDA; on CPU the checkpoint's bfloat16 where the CPU has native "
                        "bf16 (avx512_bf16/AMX), else float32")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    return p


def _generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-pixels", type=int, default=None, help="lower bound on pixels per image / frame")
    p.add_argument("--max-pixels", type=int, default=None, help="upper bound on pixels per image / frame")
    p.add_argument("--fps", type=float, default=None, help="frames per second sampled from videos")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: generation_config.json's, else {DEFAULT_MAX_NEW_TOKENS}")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_true", default=None,
                      help="sample (the sampling flags and generation_config.json decide how)")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="always pick the most likely token")
    p.add_argument("--seed", type=int, default=None, help="seed torch's RNG before generating")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--attn-implementation", default=None, choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: weight-only int8 text decoder (about half the memory, faster CPU decode; "
                        "replies can differ slightly from the unquantised model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Run Qwen2-VL vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,chat,batch,info}")
    common = _common()

    run = sub.add_parser("run", parents=[common], help="answer one prompt, streaming the reply")
    run.add_argument("prompt", help="the question ('-' reads it from stdin)")
    run.add_argument("--image", action="append", default=[], metavar="PATH", help="attach an image (repeatable)")
    run.add_argument("--video", action="append", default=[], metavar="PATH", help="attach a video (repeatable)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.add_argument("--verbose", "-v", action="store_true",
                     help="visual tokens per item, time to first token, tokens/s, peak memory (on stderr)")
    _generation_flags(run)

    chat = sub.add_parser("chat", parents=[common], help="interactive multi-turn chat (/help for commands)")
    chat.add_argument("--verbose", "-v", action="store_true", help="print timing and token counts after each reply")
    _generation_flags(chat)

    job = sub.add_parser("batch", parents=[common], help="answer a JSONL file (or a folder of images), resumably")
    source = job.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", "-i", help="JSONL requests (schema: see qwen2vl.batch)")
    source.add_argument("--images-dir", help="a folder of images, each asked --prompt")
    job.add_argument("--prompt", help="the question for every image of --images-dir")
    job.add_argument("--output", "-o", required=True, help="JSONL results (appended to; finished lines are skipped)")
    job.add_argument("--batch-size", type=int, default=4)
    job.add_argument("--retry-errors", action="store_true", help="redo lines whose recorded result is an error")
    job.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    _generation_flags(job)

    info = sub.add_parser("info", parents=[common], help="architecture, parameter counts and memory estimate")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: '{name}' requested but CUDA is not available; use --device cpu")
    return name


def _dtype(name: str, device: str, checkpoint_dtype: str | None = None) -> Any:
    """auto = bfloat16 on CUDA (float16 if the GPU lacks bf16); on CPU the checkpoint's bfloat16 where
    the CPU computes bf16 natively (avx512_bf16 / AMX: prepacked matmuls, half the memory of float32),
    else float32 (emulated bf16 matmuls are slow)."""
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "cpu" and checkpoint_dtype == "bfloat16" and _cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, DTYPES[name])


def _cpu_has_bf16() -> bool:
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def _checkpoint_dtype(model_id: str) -> str | None:
    """config.json's dtype (None when it cannot be read: loading reports that error itself)."""
    from qwen2vl.config import Qwen2VLConfig

    try:
        return Qwen2VLConfig.from_pretrained(model_id).dtype
    except Qwen2VLError:
        return None


def _sampling(args: argparse.Namespace) -> dict:
    """generate() kwargs for the flags the user gave; the rest come from generation_config.json."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: must be >= 1; got {args.max_new_tokens}")
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _model_id(model: str | None) -> str:
    """--model as given (checked), or the built-in model's folder when it is installed."""
    if model is not None:
        return jobs.resolve_model(model)
    from qwen2vl.builtin import builtin_model_dir

    folder = builtin_model_dir()
    if not (folder / "config.json").is_file():
        raise CheckpointError("--model: no model given and the built-in model is not installed; pass --model "
                              "with a checkpoint folder or a hub id such as Qwen/Qwen2-VL-2B-Instruct")
    return str(folder)


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    model_id = _model_id(args.model)
    device = _device(args.device)
    # only "auto" on CPU depends on the checkpoint's dtype: read config.json for it then alone
    checkpoint_dtype = _checkpoint_dtype(model_id) if args.dtype == "auto" and device == "cpu" else None
    model, processor = jobs.load_pipeline(
        model_id, dtype=_dtype(args.dtype, device, checkpoint_dtype), device=device, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, attn_implementation=args.attn_implementation, quantize=args.quantize)
    generation = getattr(model, "generation_config", None)
    if args.max_new_tokens is None and getattr(generation, "max_new_tokens", None) is None \
            and getattr(generation, "max_length", None) is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS  # transformers' max_length=20 is too short for a CLI
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    return model, processor, model_id


def _processor_kwargs(args: argparse.Namespace) -> dict:
    return {"fps": args.fps} if args.fps is not None else {}


def _local_media(path: str, flag: str) -> str:
    if path.startswith(("http://", "https://", "data:")):
        return path
    file = Path(path).expanduser()
    if not file.is_file():
        raise MediaError(f"{flag}: file not found: '{path}'; pass an existing image/video file or a URL")
    return str(file.resolve())


# --------------------------------------------------------------------------- generation with streaming


class _TimedStreamer:
    """Streamer shim: notes when the first new token arrives, then forwards to the text streamer."""

    def __init__(self, inner: Any = None):
        self.inner, self.puts, self.cancelled = inner, 0, False
        self.start = time.perf_counter()
        self.first: float | None = None

    def put(self, value: Any) -> None:
        if self.cancelled:  # the reader stopped (Ctrl-C, closed pipe): end generate() at its next step
            raise RuntimeError("generation cancelled")
        self.puts += 1
        if self.puts == 2:  # put #1 is the prompt (transformers' streamer protocol)
            self.first = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def _answer(model: Any, processor: Any, messages: list[dict], args: argparse.Namespace,
            on_text: Any = None) -> tuple[jobs.Result, dict]:
    """Generate one reply, calling on_text(chunk) as text arrives; returns (result, stats)."""
    import torch

    inputs = jobs.prepare_inputs(processor, [messages], _processor_kwargs(args)).to(model.device)
    text_streamer = None
    if on_text is not None:
        from qwen2vl.generation.streaming import TextIteratorStreamer

        text_streamer = TextIteratorStreamer(getattr(processor, "tokenizer", processor), skip_prompt=True,
                                             skip_special_tokens=True)
    timer = _TimedStreamer(text_streamer)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            with torch.inference_mode():
                box["out"] = model.generate(**inputs, **_sampling(args), streamer=timer)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
            if text_streamer is not None:
                text_streamer.end()  # unblock the reader
    if text_streamer is None:
        work()
    else:
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            for chunk in text_streamer:
                on_text(chunk)
        finally:
            timer.cancelled = True  # a no-op after a normal end; otherwise stops the worker
            thread.join()
    if "error" in box:
        raise box["error"]
    done = time.perf_counter()
    result = jobs.decode_results(model, processor, inputs, box["out"])[0]
    first = timer.first or done
    decode_s = max(done - first, 1e-9)
    stats = {
        "visual_tokens": _visual_tokens(model, inputs),
        "time_to_first_token_s": round(first - timer.start, 4),
        "tokens_per_s": round((result.completion_tokens - 1) / decode_s, 2) if result.completion_tokens > 1 else None,
        "total_s": round(done - timer.start, 4),
        "peak_memory_bytes": _peak_memory(model),
    }
    return result, stats


def _visual_tokens(model: Any, inputs: Any) -> list[dict]:
    """Placeholder tokens per item: t*h*w patches / merge_size² (images in order, then videos)."""
    merge = model.config.vision_config.spatial_merge_size
    items = []
    for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        grids = inputs.get(key) if hasattr(inputs, "get") else None
        for t, h, w in ([] if grids is None else grids.tolist()):
            items.append({"type": kind, "grid_thw": [t, h, w], "tokens": t * h * w // merge**2})
    return items


def _peak_memory(model: Any) -> int:
    """Peak CUDA memory allocated on the model's GPU, else the process's peak RSS (bytes)."""
    import torch

    if model.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(model.device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _print_stats(result: jobs.Result, stats: dict) -> None:
    for i, item in enumerate(stats["visual_tokens"], start=1):
        t, h, w = item["grid_thw"]
        print(f"{item['type']} {i}: {item['tokens']} visual tokens (grid t={t} h={h} w={w})", file=sys.stderr)
    rate = stats["tokens_per_s"]
    print(f"prompt {result.prompt_tokens} tokens; {result.completion_tokens} new tokens ({result.finish_reason}); "
          f"time to first token {stats['time_to_first_token_s']:.3f} s; "
          f"{'n/a' if rate is None else f'{rate:.1f}'} tokens/s; peak memory {_gib(stats['peak_memory_bytes'])}",
          file=sys.stderr)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- subcommands


def cmd_run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    images = [_local_media(p, "--image") for p in args.image]
    videos = [_local_media(p, "--video") for p in args.video]
    _sampling(args)  # validate flags before the (slow) load
    model, processor, model_id = _load(args)
    messages = jobs.prompt_messages(prompt, images, videos, args.system)
    if args.json:
        result, stats = _answer(model, processor, messages, args)
        record = {"model": model_id, "text": result.text, "prompt_tokens": result.prompt_tokens,
                  "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason, **stats}
        print(json.dumps(record, ensure_ascii=False))
    else:
        result, stats = _answer(model, processor, messages, args, on_text=_write)
        print(flush=True)
    if args.verbose:
        _print_stats(result, stats)
    return 0


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    _sampling(args)
    model, processor, model_id = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"qwen2vl chat with {model_id} - /help for commands, /quit to leave", file=sys.stderr)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[dict] = []  # media blocks for the next user message
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if not _chat_command(command, arg.strip(), history, pending, args):
                print(f"error: unknown command {command!r}; type /help for the list", file=sys.stderr)
            continue
        history.append({"role": "user", "content": [*pending, {"type": "text", "text": line}]})
        try:
            result, stats = _answer(model, processor, history, args, on_text=_write)
        except (Qwen2VLError, OSError) as exc:
            history.pop()  # the turn failed: keep the conversation as it was, attachments included
            _error(exc, args.debug)
            continue
        print(flush=True)
        pending = []
        history.append({"role": "assistant", "content": result.text})
        if args.verbose:
            _print_stats(result, stats)
    return 0


def _chat_command(command: str, arg: str, history: list[dict], pending: list[dict],
                  args: argparse.Namespace) -> bool:
    """Apply one /command to the chat state; False when the command is unknown."""
    if command == "/help":
        print(CHAT_HELP)
    elif command == "/reset":
        del history[1 if args.system else 0:]
        pending.clear()
        print("(conversation cleared)", file=sys.stderr)
    elif command in ("/image", "/video"):
        kind = command[1:]
        try:
            path = _local_media(arg, command) if arg else None
        except MediaError as exc:
            _error(exc, args.debug)
            return True
        if path is None:
            print(f"error: {command}: missing PATH; usage: {command} PATH", file=sys.stderr)
            return True
        pending.append({"type": kind, "path": path})
        print(f"(attached {kind} {arg})", file=sys.stderr)
    else:
        return False
    return True


def cmd_batch(args: argparse.Namespace) -> int:
    if args.images_dir and not args.prompt:
        raise UsageError("--images-dir: needs --prompt (the question asked of every image)")
    if args.input and args.prompt:
        raise UsageError("--prompt: only used with --images-dir; put prompts in the JSONL lines")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1; got {args.batch_size}")
    requests = list(jobs.read_requests(args.input) if args.input else jobs.folder_requests(args.images_dir, args.prompt))
    output = Path(args.output)
    if args.overwrite and output.exists():
        output.unlink()
    finished = jobs.read_finished(output, retry_errors=args.retry_errors)
    todo = sum(1 for r in requests if r.line not in finished)
    if finished:
        print(f"resuming: {len(requests) - todo} of {len(requests)} requests already in {output}", file=sys.stderr)
    model, processor, _ = _load(args)
    defaults = _sampling(args)
    if args.system:
        print("warning: --system is ignored by batch; put a system message in the requests", file=sys.stderr)
    progress = _Progress(todo)
    with output.open("a", encoding="utf-8") as out:
        try:
            counts = jobs.run_job(model, processor, requests, out, batch_size=args.batch_size, finished=finished,
                                  defaults=defaults, processor_kwargs=_processor_kwargs(args),
                                  on_result=progress.update)
        finally:
            progress.close()
    print(f"done: {counts['ok']} answered, {counts['error']} failed, {counts['skipped']} already done -> {output}",
          file=sys.stderr)
    return 0


class _Progress:
    """tqdm when installed, else a plain stderr line with rate and ETA."""

    def __init__(self, total: int):
        self.total, self.done, self.errors, self.start = total, 0, 0, time.perf_counter()
        try:
            from tqdm import tqdm  # optional extra; the plain line below is the fallback
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def update(self, record: dict) -> None:
        self.done += 1
        self.errors += "error" in record
        if self.bar is not None:
            self.bar.set_postfix(errors=self.errors, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        end = "\r" if sys.stderr.isatty() and self.done < self.total else "\n"
        print(f"{self.done}/{self.total} requests, {self.errors} errors, {rate:.2f} req/s, ETA {eta:.0f} s",
              end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_info(args: argparse.Namespace) -> int:
    from qwen2vl.config import Qwen2VLConfig

    model_id = _model_id(args.model)
    config = Qwen2VLConfig.from_pretrained(model_id)
    device = _device(args.device)
    dtype = str(_dtype(args.dtype, device, config.dtype)).removeprefix("torch.")
    report = describe(config, dtype)
    report.update(model=model_id, device=device, checkpoint_dtype=config.dtype)
    if args.json:
        print(json.dumps(report))
        return 0
    counts, mem = report["parameters"], report["memory"]
    rows = {
        "model": model_id,
        "architecture": "Qwen2VLForConditionalGeneration (model_type qwen2_vl)",
        "text": ", ".join(f"{k} {v}" for k, v in report["text"].items()),
        "vision": ", ".join(f"{k} {v}" for k, v in report["vision"].items()),
        "parameters": f"vision {_human(counts['vision'])}, text {_human(counts['text'])}, "
                      f"total {_human(counts['total'])} ({counts['total']:,})",
        "dtype": f"{dtype} on {device} (checkpoint: {config.dtype or 'unknown'})",
        "memory": f"weights {_gib(mem['weights_bytes'])}; KV cache {mem['kv_cache_bytes_per_token']:,} B/token "
                  f"({_gib(mem['kv_cache_bytes_per_token'] * 4096)} per 4096-token sequence)",
    }
    for key, value in rows.items():
        print(f"{key + ':':<14}{value}")
    return 0


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def describe(config: Any, dtype: str = "float32") -> dict:
    """Architecture, exact parameter counts from the config alone, and memory for weights + KV cache."""
    t, v = config.text_config, config.vision_config
    hidden, heads, kv = t.hidden_size, t.num_attention_heads, t.num_key_value_heads or t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or hidden // heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # decoder layer: q/k/v (with bias) + o (no bias) + gate/up/down (no bias) + 2 RMSNorm
    layer = hidden * heads * head_dim + heads * head_dim + 2 * (hidden * kv * head_dim + kv * head_dim)
    layer += heads * head_dim * hidden + 3 * hidden * t.intermediate_size + 2 * hidden
    text = t.vocab_size * hidden + t.num_hidden_layers * layer + hidden + (0 if tied else t.vocab_size * hidden)
    e, m = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
    in_ch = getattr(v, "in_channels", None) or getattr(v, "in_chans", 3)
    patch = in_ch * v.temporal_patch_size * v.patch_size**2 * e  # Conv3d, no bias
    block = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)  # 2 LayerNorm, qkv, proj, mlp
    merged = e * v.spatial_merge_size**2
    merger = 2 * e + (merged * merged + merged) + (merged * v.hidden_size + v.hidden_size)  # ln_q + 2-layer MLP
    vision = patch + v.depth * block + merger
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    return {
        "text": {"num_hidden_layers": t.num_hidden_layers, "hidden_size": hidden, "num_attention_heads": heads,
                 "num_key_value_heads": kv, "head_dim": head_dim, "intermediate_size": t.intermediate_size,
                 "vocab_size": t.vocab_size, "tie_word_embeddings": tied},
        "vision": {"depth": v.depth, "embed_dim": e, "num_heads": v.num_heads, "patch_size": v.patch_size,
                   "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size},
        "parameters": {"vision": vision, "text": text, "total": vision + text},
        "dtype": dtype,
        "memory": {"weights_bytes": (vision + text) * width,
                   "kv_cache_bytes_per_token": 2 * t.num_hidden_layers * kv * head_dim * width},
    }


# --------------------------------------------------------------------------- entry point


def _error(exc: BaseException, debug: bool) -> None:
    """One line on stderr (the traceback too with --debug)."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, (Qwen2VLError, OSError)) and str(exc):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}" + ("" if debug else " (run with --debug for the traceback)")
    print("error: " + " ".join(message.split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"run": cmd_run, "chat": cmd_chat, "batch": cmd_batch, "info": cmd_info}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as shell tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes it at exit
        return 141
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and exit 1
        _error(exc, args.debug)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())

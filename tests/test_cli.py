"""`python -m qwen2vl run|chat|info`: driven as a subprocess on tiny checkpoints (batch: test_batch.py)."""

import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from qwen2vl.config import Qwen2VLConfig
from support.tiny_checkpoint import tiny_checkpoint, write_image

ROOT = Path(__file__).resolve().parents[1]


# CPU only, so that expected values (computed in this process on CPU) hold on GPU machines too
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2vl", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@lru_cache(maxsize=None)
def _library(model_dir: Path):
    """Model + processor through the documented transformers-style API (the CLI must agree with it)."""
    from qwen2vl import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu")
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


def _library_answer(model_dir: Path, conversation: list[dict], max_new_tokens: int) -> tuple[str, int]:
    model, processor = _library(model_dir)
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    new = out[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(new, skip_special_tokens=True)[0], inputs["input_ids"].shape[1]


def _user(text: str, *images: Path) -> dict:
    return {"role": "user", "content": [*({"type": "image", "path": str(p)} for p in images),
                                        {"type": "text", "text": text}]}


# --------------------------------------------------------------------------- run


def test_run_streams_the_answer():
    # all logits equal -> greedy picks id 0 ('!') every step, until --max-new-tokens
    proc = _cli("run", "--model", str(tiny_checkpoint("constant")), "--max-new-tokens", "5", "Hello there")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "!!!!!\n"


def test_max_new_tokens_defaults_to_generation_config_then_256(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("constant"), folder)
    proc = _cli("run", "--model", str(folder), "Hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "!" * 256 + "\n"  # no limit in generation_config.json: the CLI's default
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 3}))
    proc = _cli("run", "--model", str(folder), "Hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "!!!\n"


def test_run_matches_the_library_api(tmp_path):
    model = tiny_checkpoint("random")
    image = write_image(tmp_path / "cat.png", 84, 56, seed=3)
    proc = _cli("run", "--model", str(model), "--image", str(image), "--max-new-tokens", "8", "What is this?")
    assert proc.returncode == 0, proc.stderr
    expected, _ = _library_answer(model, [_user("What is this?", image)], 8)
    assert proc.stdout == expected + "\n"


def test_run_quantize_int8_matches_the_library_with_quantize_int8(tmp_path):
    from qwen2vl import AutoProcessor, Qwen2VLForConditionalGeneration
    from qwen2vl.quantize import quantize_int8

    model_dir = tiny_checkpoint("random")
    image = write_image(tmp_path / "cat.png", 84, 56, seed=3)
    proc = _cli("run", "--model", str(model_dir), "--quantize", "int8", "--image", str(image),
                "--max-new-tokens", "8", "What is this?")
    assert proc.returncode == 0, proc.stderr
    model = quantize_int8(Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval())
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor.apply_chat_template([_user("What is this?", image)], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    new = model.generate(**inputs, max_new_tokens=8)[:, inputs["input_ids"].shape[1]:]
    assert proc.stdout == processor.batch_decode(new, skip_special_tokens=True)[0] + "\n"
    bad = _cli("run", "--model", str(model_dir), "--quantize", "int4", "hi")
    assert bad.returncode == 2 and "int8" in bad.stderr


def test_run_json_and_verbose(tmp_path):
    model = tiny_checkpoint("constant")
    image = write_image(tmp_path / "a.png", 84, 56)  # 84x56 px = 6x4 patches of 14 -> 24 / 2² = 6 tokens
    proc = _cli("run", "--model", str(model), "--image", str(image), "--json", "--verbose",
                "--max-new-tokens", "4", "Describe.")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)  # exactly one JSON object on stdout
    _, prompt_len = _library_answer(model, [_user("Describe.", image)], 1)
    assert record["text"] == "!!!!"
    assert (record["completion_tokens"], record["finish_reason"]) == (4, "length")
    assert record["prompt_tokens"] == prompt_len
    assert record["visual_tokens"] == [{"type": "image", "grid_thw": [1, 4, 6], "tokens": 6}]
    assert record["model"] == str(model)
    assert "image 1: 6 visual tokens (grid t=1 h=4 w=6)" in proc.stderr
    for needle in ("time to first token", "tokens/s", "peak memory", f"prompt {prompt_len} tokens"):
        assert needle in proc.stderr


def test_run_prompt_from_stdin_and_seeded_sampling():
    model = str(tiny_checkpoint("random"))
    args = ("run", "--model", model, "--do-sample", "--temperature", "1.5", "--top-k", "0", "--seed", "7",
            "--max-new-tokens", "6", "-")
    first, second = _cli(*args, stdin="Tell me a story."), _cli(*args, stdin="Tell me a story.")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


# --------------------------------------------------------------------------- errors


def test_missing_model_folder_is_one_line():
    proc = _cli("run", "--model", "/nonexistent/checkpoint", "hi")
    assert proc.returncode == 1
    assert _one_error_line(proc) == ("error: --model: folder '/nonexistent/checkpoint' not found; "
                                     "pass an existing checkpoint folder or a hub id (owner/name)")


def test_folder_without_config(tmp_path):
    proc = _cli("info", "--model", str(tmp_path))
    assert proc.returncode == 1
    assert "has no config.json" in _one_error_line(proc)


def test_bad_image_path_is_one_line_and_debug_shows_traceback(tmp_path):
    args = ["run", "--model", str(tiny_checkpoint("constant")), "--image", str(tmp_path / "nope.png"), "hi"]
    proc = _cli(*args)
    assert proc.returncode == 1
    assert _one_error_line(proc) == (f"error: --image: file not found: '{tmp_path / 'nope.png'}'; "
                                     "pass an existing image/video file or a URL")
    proc = _cli(*args, "--debug")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --image: file not found")


def test_undecodable_image_is_one_line(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    proc = _cli("run", "--model", str(tiny_checkpoint("constant")), "--image", str(bad), "hi")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    _one_error_line(proc)


@pytest.mark.parametrize(
    "args",
    [
        ("run",),  # no prompt
        ("run", "--greedy", "--do-sample", "hi"),
        ("run", "--max-new-tokens", "0", "hi"),
        ("run", "--dtype", "int3", "hi"),
        ("launch",),
    ],
)
def test_usage_errors_exit_2(args):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------- chat


def test_chat_keeps_history_and_attaches_images(tmp_path):
    model = tiny_checkpoint("random")
    image = write_image(tmp_path / "p.png", 56, 56, seed=5)
    script = f"/help\n/image {tmp_path / 'missing.png'}\n/image {image}\nWhat is this?\n/bogus\nAnd the colour?\n/quit\nnever sent\n"
    proc = _cli("chat", "--model", str(model), "--max-new-tokens", "6", stdin=script)
    assert proc.returncode == 0, proc.stderr

    turn1 = [_user("What is this?", image)]
    answer1, _ = _library_answer(model, turn1, 6)
    turn2 = turn1 + [{"role": "assistant", "content": answer1}, _user("And the colour?")]
    answer2, _ = _library_answer(model, turn2, 6)
    help_text = proc.stdout.split("anything else is sent as your message; replies are kept in the conversation.\n")
    assert len(help_text) == 2 and "/image PATH" in help_text[0]
    assert help_text[1] == f"{answer1}\n{answer2}\n"
    assert "error: /image: file not found" in proc.stderr  # a bad attachment does not end the session
    assert "unknown command '/bogus'" in proc.stderr


def test_chat_reset_forgets_the_conversation():
    model = tiny_checkpoint("random")
    proc = _cli("chat", "--model", str(model), "--max-new-tokens", "5", stdin="Hi\n/reset\nHello\n")
    assert proc.returncode == 0, proc.stderr
    answer1, _ = _library_answer(model, [_user("Hi")], 5)
    answer2, _ = _library_answer(model, [_user("Hello")], 5)  # no trace of the first turn
    assert proc.stdout == f"{answer1}\n{answer2}\n"


# --------------------------------------------------------------------------- info


def test_info_counts_match_the_built_model():
    folder = tiny_checkpoint("random")
    model, _ = _library(folder)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    proc = _cli("info", "--model", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["parameters"] == {"vision": vision, "text": total - vision, "total": total}
    assert (report["device"], report["dtype"]) == ("cpu", "float32")  # auto on a machine without CUDA
    text = _cli("info", "--model", str(folder))
    assert text.returncode == 0, text.stderr
    assert f"({total:,})" in text.stdout and "Qwen2VLForConditionalGeneration" in text.stdout


@pytest.mark.parametrize(("preset", "billions"), [("2b", 2.21), ("7b", 8.29)])
def test_info_from_config_alone(tmp_path, preset, billions):
    # published totals (reference-notes §1.4): 2.21B / 8.29B; only config.json is present, no weights
    config = Qwen2VLConfig.preset(preset)
    config.save_pretrained(tmp_path)
    proc = _cli("info", "--model", str(tmp_path), "--json", "--dtype", "bf16", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    total = report["parameters"]["total"]
    assert round(total / 1e9, 2) == billions
    assert report["memory"]["weights_bytes"] == 2 * total
    t = config.text_config
    # K and V, every layer, kv_heads x head_dim values of 2 bytes
    assert report["memory"]["kv_cache_bytes_per_token"] == 2 * t.num_hidden_layers * t.num_key_value_heads * 128 * 2


# --------------------------------------------------------------------------- batch progress line


def test_progress_without_tqdm_prints_rate_and_eta(monkeypatch, capsys):
    from qwen2vl import cli

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` now raises ImportError
    progress = cli._Progress(total=2)
    assert progress.bar is None
    progress.update({"line": 1, "text": "a"})
    progress.update({"line": 2, "error": "boom"})
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("1/2 requests, 0 errors, ") and "req/s, ETA " in lines[0]
    assert lines[1].startswith("2/2 requests, 1 errors, ") and lines[1].endswith("ETA 0 s")


# --------------------------------------------------------------------------- the built-in model


def _example_answers() -> dict[tuple[str, str], str]:
    """(file, question) -> answer, from the table in examples/README.md (the generator's ground truth)."""
    table = (ROOT / "examples" / "README.md").read_text()
    return {(f, q): a for f, q, a in re.findall(r"^\| `([^`]+)` \| (.+?) \| `([^`]+)` \|$", table, re.M)}


def test_builtin_model_answers_the_bundled_example():
    answers = _example_answers()
    question = next(q for f, q in answers if f == "example.png")
    proc = _cli("run", "--image", str(ROOT / "examples" / "example.png"), question)  # no --model: built-in
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == answers[("example.png", question)]


def test_auto_dtype_follows_a_bf16_checkpoint_on_cpus_with_native_bf16(monkeypatch):
    from qwen2vl import cli

    monkeypatch.setattr(cli, "_cpu_has_bf16", lambda: True)
    assert cli._dtype("auto", "cpu", "bfloat16") is torch.bfloat16
    assert cli._dtype("auto", "cpu", "float32") is torch.float32
    assert cli._dtype("auto", "cpu", None) is torch.float32
    assert cli._dtype("float32", "cpu", "bfloat16") is torch.float32  # an explicit --dtype wins
    monkeypatch.setattr(cli, "_cpu_has_bf16", lambda: False)  # emulated bf16 would be slow
    assert cli._dtype("auto", "cpu", "bfloat16") is torch.float32

"""qwen2vl.batch: request schema, resume bookkeeping, and `qwen2vl batch` end to end on tiny checkpoints."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2vl.batch import Failed, folder_requests, parse_request, read_finished, read_requests
from qwen2vl.errors import RequestError
from support.tiny_checkpoint import tiny_checkpoint, write_image


# CPU only, so that expected values (computed in this process on CPU) hold on GPU machines too
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2vl", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# --------------------------------------------------------------------------- schema (no model)


def test_prompt_request_resolves_media_against_the_input_folder(tmp_path):
    write_image(tmp_path / "a.png")
    req = parse_request({"id": "x", "prompt": "Hi", "images": "a.png", "max_new_tokens": 3}, 7, tmp_path)
    assert (req.line, req.id, req.generate_kwargs) == (7, "x", {"max_new_tokens": 3})
    (user,) = req.messages
    assert user["role"] == "user"
    assert user["content"] == [{"type": "image", "path": str(tmp_path / "a.png")}, {"type": "text", "text": "Hi"}]


def test_prompt_request_with_system_and_video(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"not decoded here")
    req = parse_request({"prompt": "What?", "videos": ["v.mp4"], "system": "Be brief."}, 1, tmp_path)
    assert req.messages[0] == {"role": "system", "content": "Be brief."}
    assert req.messages[1]["content"][0] == {"type": "video", "path": str(tmp_path / "v.mp4")}


def test_messages_request_keeps_blocks_and_resolves_paths(tmp_path):
    write_image(tmp_path / "b.png")
    messages = [{"role": "user", "content": [{"type": "image", "path": "b.png"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "image", "url": "https://example.com/c.png"}]}]
    req = parse_request({"messages": messages}, 2, tmp_path)
    assert req.messages[0]["content"][0]["path"] == str(tmp_path / "b.png")
    assert req.messages[1] == messages[1]
    assert req.messages[2]["content"][0]["url"] == "https://example.com/c.png"  # URLs pass through


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"prompt": "a", "messages": []}, "exactly one of 'prompt' or 'messages'"),
        ({"id": 1}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "a", "colour": "red"}, "unknown field(s) ['colour']"),
        ({"prompt": 3}, "'prompt' must be a string"),
        ({"prompt": "a", "images": ["missing.png"]}, "images[0]: file not found"),
        ({"prompt": "a", "images": {"a": 1}}, "images: expected a path or a list of paths"),
        ({"messages": [{"content": "hi"}]}, "messages[0]: expected an object with 'role' and 'content'"),
        ({"messages": [], "images": ["x.png"]}, "go inside 'messages'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_invalid_requests_name_the_problem(tmp_path, obj, needle):
    with pytest.raises(RequestError) as info:
        parse_request(obj, 4, tmp_path)
    assert needle in str(info.value)


def test_read_requests_reports_bad_lines_and_skips_blank_ones(tmp_path):
    src = tmp_path / "req.jsonl"
    src.write_text('{"id": "a", "prompt": "one"}\n\n{not json\n{"id": "b", "prompt": "x", "images": ["no.png"]}\n')
    items = list(read_requests(src))
    assert [i.line for i in items] == [1, 3, 4]
    assert not isinstance(items[0], Failed)
    assert isinstance(items[1], Failed) and "line 3: invalid JSON" in str(items[1].error)
    assert isinstance(items[2], Failed) and items[2].id == "b" and "no.png" in str(items[2].error)


def test_read_requests_missing_file(tmp_path):
    with pytest.raises(RequestError, match="--input: cannot read"):
        list(read_requests(tmp_path / "nope.jsonl"))


def test_folder_requests_one_per_image_sorted(tmp_path):
    for name in ("b.png", "a.jpg"):
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("skip me")
    reqs = list(folder_requests(tmp_path, "Describe.", max_new_tokens=2, temperature=None))
    assert [(r.line, r.id) for r in reqs] == [(1, "a.jpg"), (2, "b.png")]
    assert reqs[0].generate_kwargs == {"max_new_tokens": 2}
    (tmp_path / "empty").mkdir()
    with pytest.raises(RequestError, match="no images in"):
        list(folder_requests(tmp_path / "empty", "x"))
    with pytest.raises(RequestError, match="--images-dir: folder .* not found"):
        list(folder_requests(tmp_path / "absent", "x"))


def test_read_finished_cuts_a_truncated_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"line": 1, "text": "a"}\n{"line": 2, "error": "boom"}\n{"line": 3, "te')
    assert read_finished(out) == {1, 2}
    assert out.read_text() == '{"line": 1, "text": "a"}\n{"line": 2, "error": "boom"}\n'
    assert read_finished(out, retry_errors=True) == {1}
    assert read_finished(tmp_path / "absent.jsonl") == set()


# --------------------------------------------------------------------------- end to end (subprocess)


def _job(tmp_path: Path) -> Path:
    write_image(tmp_path / "img1.png", 56, 56, seed=1)
    write_image(tmp_path / "img2.png", 84, 56, seed=2)
    lines = [
        {"id": "first", "prompt": "Describe.", "images": ["img1.png"]},
        {"id": "broken", "prompt": "Describe.", "images": ["does-not-exist.png"]},
        {"id": "chat", "messages": [{"role": "user", "content": [{"type": "image", "path": "img2.png"},
                                                                 {"type": "text", "text": "Colour?"}]}]},
        {"id": "text-only", "prompt": "Hello", "max_new_tokens": 2},
        {"id": "last", "prompt": "Two images.", "images": ["img1.png", "img2.png"]},
    ]
    src = tmp_path / "requests.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return src


def test_batch_records_the_broken_line_and_resumes_after_truncation(tmp_path):
    model = tiny_checkpoint("constant")  # every answer is '!' * max_new_tokens (all logits equal)
    src, out = _job(tmp_path), tmp_path / "results.jsonl"
    args = ["batch", "--model", str(model), "--input", str(src), "--output", str(out),
            "--max-new-tokens", "3", "--batch-size", "2"]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    records = {r["line"]: r for r in _lines(out)}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert "does-not-exist.png" in records[2]["error"] and records[2]["id"] == "broken"
    assert set(records[2]) == {"line", "id", "error"}
    for line, expected in ((1, "!!!"), (3, "!!!"), (4, "!!"), (5, "!!!")):
        assert records[line]["text"] == expected and records[line]["finish_reason"] == "length"
        assert records[line]["completion_tokens"] == len(expected)
    assert "done: 4 answered, 1 failed, 0 already done" in proc.stderr
    assert "req/s" in proc.stderr  # the progress bar (tqdm, or the plain line without it)

    # simulate an interruption: line 1's answer is marked, the last line is cut half-way
    kept = out.read_text().splitlines(keepends=True)
    marked = json.loads(kept[0])
    marked["text"] = "KEPT"
    out.write_text(json.dumps(marked) + "\n" + "".join(kept[1:-1]) + kept[-1][: len(kept[-1]) // 2])
    cut_line = json.loads(kept[-1])["line"]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    after = _lines(out)  # every line parses: the torn one was removed before appending
    assert sorted(r["line"] for r in after) == [1, 2, 3, 4, 5]  # nothing done twice
    assert after[-1]["line"] == cut_line == 5 and after[-1]["text"] == "!!!"
    assert next(r for r in after if r["line"] == marked["line"])["text"] == "KEPT"  # not redone
    assert "done: 1 answered, 0 failed, 4 already done" in proc.stderr

    # --retry-errors redoes only the failed line (still failing: the file is still missing)
    proc = _cli(*args, "--retry-errors")
    assert proc.returncode == 0, proc.stderr
    assert "done: 0 answered, 1 failed, 4 already done" in proc.stderr


def test_batch_matches_one_by_one_generation(tmp_path):
    # a batched, left-padded forward must give each row the answer it gets alone
    model = tiny_checkpoint("random")
    src = _job(tmp_path)
    outs = {}
    for size in ("1", "3"):
        out = tmp_path / f"out{size}.jsonl"
        proc = _cli("batch", "--model", str(model), "--input", str(src), "--output", str(out),
                    "--max-new-tokens", "4", "--batch-size", size)
        assert proc.returncode == 0, proc.stderr
        outs[size] = {r["line"]: r for r in _lines(out)}
    assert outs["1"] == outs["3"]


def test_batch_images_dir(tmp_path):
    images = tmp_path / "pics"
    images.mkdir()
    for i, name in enumerate(("z.png", "a.png")):
        write_image(images / name, 56, 56, seed=i)
    out = tmp_path / "out.jsonl"
    proc = _cli("batch", "--model", str(tiny_checkpoint("constant")), "--images-dir", str(images),
                "--prompt", "What is shown?", "--output", str(out), "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert [(r["line"], r["id"], r["text"]) for r in _lines(out)] == [(1, "a.png", "!!"), (2, "z.png", "!!")]


def test_batch_usage_errors(tmp_path):
    proc = _cli("batch", "--images-dir", str(tmp_path), "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --images-dir: needs --prompt (the question asked of every image)"
    proc = _cli("batch", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "--input: cannot read" in proc.stderr


def test_batch_on_the_builtin_model_answers_every_example(tmp_path):
    # examples/README.md lists (file, question, answer); the answers are the generator's ground truth
    examples = Path(__file__).resolve().parents[1] / "examples"
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \| `([^`]+)` \|$", (examples / "README.md").read_text(), re.M)
    assert len(rows) >= 3
    src = tmp_path / "examples.jsonl"
    src.write_text("".join(json.dumps({"id": f"{f}: {q}", "prompt": q,
                                       ("videos" if f.endswith(".mp4") else "images"): [str(examples / f)]}) + "\n"
                           for f, q, _ in rows))
    out = tmp_path / "answers.jsonl"
    proc = _cli("batch", "--input", str(src), "--output", str(out), "--batch-size", "8")  # no --model: built-in
    assert proc.returncode == 0, proc.stderr
    assert [r["text"].strip() for r in _lines(out)] == [a for _, _, a in rows]

"""The built-in model: a tiny Qwen2-VL trained in this repository (scripts/train_builtin.py) on
qwen2vl.synthetic tasks, shipped in hub layout; `qwen2vl run` uses it when no --model is given."""

from pathlib import Path

# the qwen2vl.synthetic tasks it was trained on (and is tested on); "digits" is not among them
BUILTIN_TASKS = ("color", "shape", "count", "position", "motion")


def builtin_model_dir() -> Path:
    """Folder of the built-in checkpoint (config.json, model.safetensors, tokenizer and processor files)."""
    return Path(__file__).resolve().parent

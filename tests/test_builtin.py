"""The built-in model: hub layout within 25 MB, greedy defaults, and >= 90% exact answers on held-out
synthetic questions (a seed that training, validation and the examples never used)."""

import json
import re
from pathlib import Path

import pytest
import torch

from qwen2vl.builtin import BUILTIN_TASKS, builtin_model_dir
from qwen2vl.config import GenerationConfig, Qwen2VLConfig
from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration
from qwen2vl.processing.processor import AutoProcessor
from qwen2vl.synthetic import make_samples
from qwen2vl.train import answer_questions, evaluate

HUB_FILES = ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
             "tokenizer.json", "tokenizer_config.json", "chat_template.json")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HELD_OUT_SEED = "heldout-test"  # training uses "train-<seed>-<step>", the script's validation "validation"


@pytest.fixture(scope="module")
def model_and_processor():
    folder = builtin_model_dir()
    return Qwen2VLForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def test_hub_layout_within_25_mb():
    folder = builtin_model_dir()
    assert all((folder / name).is_file() for name in HUB_FILES)
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 25_000_000, f"built-in folder is {total:,} bytes"


def test_config_is_a_tiny_qwen2_vl_with_the_real_vocabulary():
    config = Qwen2VLConfig.from_pretrained(builtin_model_dir())
    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == 151936 and config.tie_word_embeddings
    assert 48 <= text.hidden_size <= 64 and vision.hidden_size == text.hidden_size
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    tokenizer = json.loads((builtin_model_dir() / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"]) == 151657


def test_generation_defaults_are_greedy_and_stop_at_im_end():
    generation = GenerationConfig.from_pretrained(builtin_model_dir())
    assert generation.do_sample is False
    assert generation.eos_token_ids == [151645, 151643]


def test_images_are_capped_at_the_training_resolution(model_and_processor):
    _, processor = model_and_processor
    from PIL import Image

    out = processor(text=["<|image_pad|>"], images=[Image.new("RGB", (640, 480), "white")], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert h * 14 * w * 14 <= 112 * 112 and (h, w) == (6, 8)  # smart_resize: 480x640 -> 84x112


def test_weights_are_bf16(model_and_processor):
    model, _ = model_and_processor
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_held_out_accuracy_is_at_least_90_percent(model_and_processor):
    model, processor = model_and_processor
    samples = make_samples(200, seed=HELD_OUT_SEED, tasks=BUILTIN_TASKS)
    scores = evaluate(model, processor, samples, max_new_tokens=6, batch_size=100)
    assert scores["all"] >= 0.9, scores
    assert min(scores[t] for t in BUILTIN_TASKS) >= 0.7, scores


def test_bundled_examples_are_answered_as_the_readme_says(model_and_processor):
    # examples/README.md lists `| file | question | answer |` rows; they are what the README's command shows
    model, processor = model_and_processor
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \| `([^`]+)` \|$", (EXAMPLES / "README.md").read_text(), re.M)
    assert len(rows) >= 3 and any(name == "example.png" for name, _, _ in rows)
    from PIL import Image

    from qwen2vl.processing.media import load_image, load_video

    class Item:  # the shape of a synthetic Sample, loaded from the files
        def __init__(self, name, question):
            self.question, path = question, str(EXAMPLES / name)
            is_video = name.endswith(".mp4")
            self.image = None if is_video else load_image(path)
            self.video = [Image.fromarray(f) for f in load_video(path)[0]] if is_video else None

    items = [Item(name, question) for name, question, _ in rows]
    assert answer_questions(model, processor, items) == [answer for _, _, answer in rows]

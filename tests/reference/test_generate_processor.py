"""The doc page's batch example runs unchanged on qwen2vl (processor -> generate -> trim -> batch_decode)
and gives transformers' tokens."""

import json
import shutil

import torch

from generation.oracle_models import checkpoint, models
from support.media import make_video
from support.tiny_checkpoint import PREPROCESSOR, write_image
from support.tokenizer import FILES, tokenizer_dir


def _processor_folder(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint(), folder)
    for name in FILES:
        shutil.copy(tokenizer_dir() / name, folder / name)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder


def test_doc_page_batch_example(tmp_path):
    from qwen2vl import AutoProcessor

    processor = AutoProcessor.from_pretrained(_processor_folder(tmp_path))
    image = [str(write_image(tmp_path / f"{i}.png", 28 * (2 + i), 56, seed=i)) for i in range(4)]
    video = str(make_video(tmp_path / "v.mp4", num_frames=12, fps=6, width=56, height=56))
    conversation1 = [{"role": "user", "content": [{"type": "image", "path": image[0]},
                                                  {"type": "text", "text": "Describe this image."}]}]
    conversation2 = [{"role": "user", "content": [{"type": "image", "path": image[1]},
                                                  {"type": "image", "path": image[2]},
                                                  {"type": "text", "text": "What is written in the pictures?"}]}]
    conversation3 = [{"role": "user", "content": "who are you?"}]
    conversation4 = [{"role": "user", "content": [
        {"type": "image", "path": image[2]}, {"type": "image", "path": image[3]},
        {"type": "video", "path": video},
        {"type": "text", "text": "What are the common elements in these medias?"}]}]
    conversations = [conversation1, conversation2, conversation3, conversation4]
    inputs = processor.apply_chat_template(conversations, fps=1, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", padding=True)
    reference, model = models()
    inputs = inputs.to(model.device)
    assert {"pixel_values", "pixel_values_videos", "mm_token_type_ids"} <= set(inputs)
    output_ids = model.generate(**inputs, max_new_tokens=32, min_new_tokens=32)
    assert torch.equal(output_ids, reference.generate(**inputs, max_new_tokens=32, min_new_tokens=32))
    # the doc page's trimming and decoding, unchanged
    generated_ids = [output_ids[len(input_ids):] for input_ids, output_ids in zip(inputs.input_ids, output_ids)]
    output_text = processor.batch_decode(generated_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert len(output_text) == 4
    assert output_text[2] == processor.decode(output_ids[2, inputs.input_ids.shape[1]:], skip_special_tokens=True)

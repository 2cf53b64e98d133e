"""Qwen2VLProcessor from first principles: placeholder expansion order, mm_token_type_ids, per-item sizes,
errors that name where the problem is, budgeting from headers, save/load."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from support.media import make_video
from support.tokenizer import processor_folder

from qwen2vl.errors import InputError, MediaError
from qwen2vl.processing.processor import AutoProcessor, BatchFeature, Qwen2VLProcessor

IMG, VID = "<|image_pad|>", "<|video_pad|>"
HUB = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return processor_folder(tmp_path_factory.mktemp("ckpt"), HUB)


@pytest.fixture(scope="module")
def proc(folder):
    return AutoProcessor.from_pretrained(folder)


def image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_expansion_follows_the_flattened_batch_order(proc):
    # image k has grid (1, 2a, 2b) -> a*b tokens; order over rows: row 0 holds images 0,1; row 1 image 2
    texts = [f"a{IMG}b{IMG}", f"{VID}c{IMG}"]
    assert proc.expand_placeholders(texts, [1, 3, 2], [4]) == [f"a{IMG}b{IMG * 3}", f"{VID * 4}c{IMG * 2}"]


def test_call_expands_each_image_to_grid_over_four(proc):
    out = proc(text=[f"x{IMG}", f"{IMG}{IMG}y"], images=[image(56, 56), image(28, 112), image(84, 56)],
               padding=True, return_tensors="pt")
    assert out.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 8], [1, 6, 4]]
    assert (out.input_ids == proc.image_token_id).sum(1).tolist() == [4, 4 + 6]
    assert out.pixel_values.shape == (16 + 16 + 24, 1176) and out.pixel_values.dtype == torch.float32
    assert torch.equal(out.mm_token_type_ids, (out.input_ids == proc.image_token_id).long())


def test_mm_token_type_ids_mark_images_1_videos_2_and_pads_0(proc):
    assert proc.create_mm_token_type_ids([[151643, 151655, 151656, 9707]]) == [[0, 1, 2, 0]]


def test_count_mismatch_names_the_counts_and_conversation(proc):
    with pytest.raises(InputError, match=r"found 2 .*per prompt: \[1, 1\]\) but 1 images"):
        proc(text=[IMG, IMG], images=[image(28, 28)])
    with pytest.raises(InputError, match=r"conversation 1: 1 placeholders, 0 images"):
        proc(text=[IMG, IMG], images=[[image(28, 28)], []])
    with pytest.raises(InputError, match="no videos were passed"):
        proc(text=[VID])


def test_truncation_through_placeholders_is_refused(proc):
    with pytest.raises(InputError, match=r"text\[0\]: truncation cut"):
        proc(text=[f"hello {IMG}"], images=[image(56, 56)], truncation=True, max_length=3)


def test_per_item_sizes_from_content_blocks(proc, tmp_path):
    path = tmp_path / "p.png"
    image(100, 100).save(path)
    conv = [{"role": "user", "content": [
        {"type": "image", "image": str(path), "resized_height": 56, "resized_width": 84},
        {"type": "image", "image": str(path), "max_pixels": 28 * 28 * 4},
        {"type": "image", "image": str(path)}]}]
    out = proc.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    # 100x100 -> smart_resize: 112x112 by default (grid 8x8), 56x56 under a 4-token budget
    assert out.image_grid_thw.tolist() == [[1, 4, 6], [1, 4, 4], [1, 8, 8]]


def test_media_errors_name_the_content_block_and_source(proc, tmp_path):
    conv = [{"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image", "path": str(tmp_path / "gone.png")}]}]
    with pytest.raises(MediaError, match=r"conversations\[1\]\.messages\[1\]\.content\[1\].*gone\.png"):
        proc.apply_chat_template([conv[:1], conv], tokenize=True, padding=True)


def test_video_sources_are_decoded_with_sampling(proc, tmp_path):
    path = make_video(tmp_path / "v.mp4", num_frames=8, fps=4, width=56, height=56)
    conv = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "?"}]}]
    every = proc.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    sampled = proc.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt", num_frames=4)
    assert every.video_grid_thw.tolist() == [[4, 4, 4]] and sampled.video_grid_thw.tolist() == [[2, 4, 4]]
    assert int((sampled.mm_token_type_ids == 2).sum()) == 2 * 4 * 4 // 4


def test_budget_from_sizes_is_first_principles(proc):
    counts = proc.count_visual_tokens(image_sizes=[(480, 640), (28, 28)], video_sizes=[(5, 56, 56)])
    # 480x640 -> 476x644 -> 34x46 patches = 391 tokens; 28x28 -> 56x56 (min 3136 px) -> 4x4 patches = 4 tokens;
    # video: 5 frames -> 3 temporal patches x 4 x 4 = 48 patches = 12 tokens
    assert counts.num_image_tokens == [391, 4] and counts.num_video_tokens == [12] and counts.total == 407
    assert counts["num_image_patches"] == [1564, 16]
    # max 12544 px: beta = sqrt(307200 / 12544) = 4.95 -> floor(3.46) x floor(4.62) -> 84x112 -> 6x8 patches
    small = proc.count_visual_tokens(image_sizes=[(480, 640)], max_pixels=28 * 28 * 16)
    assert small.num_image_tokens == [12]


def test_budget_from_headers_equals_processing(proc, tmp_path):
    paths = []
    for k, (h, w) in enumerate([(50, 70), (112, 30)]):
        paths.append(tmp_path / f"{k}.jpg")
        image(h, w, seed=k).save(paths[-1])
    rotated = image(40, 90)  # EXIF orientation 6 (rotate 90): displayed as 90x40
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "r.jpg", exif=exif)
    video = make_video(tmp_path / "v.mp4", num_frames=6, fps=3, width=84, height=56)
    conv = [{"role": "user", "content": [{"type": "image", "path": str(p)} for p in paths]
             + [{"type": "image", "url": str(tmp_path / "r.jpg")}, {"type": "video", "path": str(video)},
                {"type": "image", "image": str(paths[0]), "resized_height": 280, "resized_width": 280}]}]
    counted = proc.count_conversation_tokens(conv, fps=2)
    out = proc.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt", fps=2)
    merge = 4
    assert counted.num_image_tokens == [int(g.prod()) // merge for g in out.image_grid_thw]
    assert counted.num_video_tokens == [int(g.prod()) // merge for g in out.video_grid_thw]
    # rotated: 90 high, 40 wide -> rounds to 84x28 = 2352 < 3136 px -> scaled up by 0.933 and ceiled: 84x56
    assert out.image_grid_thw[2].tolist() == [1, 6, 4]


def test_apply_chat_template_return_forms(proc):
    conv = [{"role": "user", "content": "Hi"}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and isinstance(text, str)
    ids = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    assert ids == [proc.tokenizer.encode(text)]
    batch = proc.apply_chat_template([conv, conv + conv], tokenize=True, return_dict=True, padding=True,
                                     return_tensors="np")
    assert isinstance(batch, BatchFeature) and batch["input_ids"].shape[0] == 2
    assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids"}


def test_from_pretrained_bounds_reach_images_and_videos(folder):
    proc = Qwen2VLProcessor.from_pretrained(folder, min_pixels=1000, max_pixels=5000)
    assert (proc.image_processor.min_pixels, proc.image_processor.max_pixels) == (1000, 5000)
    assert (proc.video_processor.min_pixels, proc.video_processor.max_pixels) == (1000, 5000)
    hub = Qwen2VLProcessor.from_pretrained(folder)
    assert (hub.video_processor.min_pixels, hub.video_processor.max_pixels) == (3136, 12845056)


def test_video_preprocessor_config_takes_precedence(folder, tmp_path):
    for item in folder.iterdir():
        shutil.copy(item, tmp_path / item.name)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({**HUB, "max_pixels": 28 * 28 * 8}))
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert proc.video_processor.max_pixels == 28 * 28 * 8 and proc.image_processor.max_pixels == 12845056


def test_save_pretrained_round_trip(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json"} <= names
    again = AutoProcessor.from_pretrained(tmp_path)
    assert again.image_processor.max_pixels == 12845056 and again.chat_template == proc.chat_template
    img = image(60, 60)
    a, b = proc(text=[IMG], images=[img]), again(text=[IMG], images=[img])
    assert a["input_ids"] == b["input_ids"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_decoding_helpers(proc):
    ids = torch.tensor([[151644, 9707, 151645]])
    assert proc.batch_decode(ids) == ["<|im_start|>Hello<|im_end|>"]
    assert proc.post_process_image_text_to_text(ids) == ["Hello"]
    assert proc.decode(ids[0], skip_special_tokens=True) == "Hello"


def test_per_video_frame_keys_are_honoured_and_counted(proc, tmp_path):
    path = make_video(tmp_path / "v.mp4", num_frames=8, fps=4, width=56, height=56)
    conv = [{"role": "user", "content": [{"type": "video", "video": str(path), "nframes": 2},
                                         {"type": "video", "video": str(path)}]}]
    out = proc.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    assert out.video_grid_thw.tolist() == [[1, 4, 4], [4, 4, 4]]  # 2 sampled frames; all 8 frames
    assert proc.count_conversation_tokens(conv).num_video_tokens == [4, 16]


def test_video_errors_name_the_content_block(proc, tmp_path):
    conv = [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "video", "path": str(tmp_path / "nope.mp4")}]}]
    with pytest.raises(MediaError, match=r"conversations\[0\]\.messages\[0\]\.content\[1\].*nope\.mp4"):
        proc.apply_chat_template(conv, tokenize=True, fps=1)

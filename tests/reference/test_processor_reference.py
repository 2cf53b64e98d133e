"""Our processor vs transformers 5.24's on the doc page's examples (a folder with our tokenizer files and a
hub-style preprocessor_config.json). Ids, masks, mm_token_type_ids and grids must be identical; pixels equal
transformers' PIL-backed processor (our default) and, for sides already multiples of 28, its default one."""

import base64

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from support.media import make_video
from support.tokenizer import processor_folder

from qwen2vl.processing.processor import AutoProcessor

HUB_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711],
                    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
KEYS_EXACT = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return processor_folder(tmp_path_factory.mktemp("ckpt"), HUB_PREPROCESSOR)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    out = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    sizes = {"a.png": (56, 84), "b.png": (100, 60), "c.jpg": (112, 112), "d.png": (47, 90)}  # (h, w)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out / name, quality=95)
    make_video(out / "v.mp4", num_frames=8, fps=4, width=56, height=56)
    return {name.split(".")[0]: str(out / name) for name in list(sizes) + ["v.mp4"]}


@pytest.fixture(scope="module")
def ref(folder):
    return transformers.AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref_pil(folder, ref):
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
    return transformers.Qwen2VLProcessor(image_processor=image_processor, tokenizer=ref.tokenizer,
                                         video_processor=ref.video_processor, chat_template=ref.chat_template)


@pytest.fixture(scope="module")
def ours(folder):
    return AutoProcessor.from_pretrained(folder)


def assert_same(a, b, pixels=True):
    assert sorted(a) == sorted(b)
    for key in b:
        if key in KEYS_EXACT:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
        elif pixels:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def run_both(ours, theirs, conversations, **kwargs):
    options = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)
    return ours.apply_chat_template(conversations, **options), theirs.apply_chat_template(conversations, **options)


def test_single_image_doc_example(ours, ref, ref_pil, media):
    conv = [{"role": "user", "content": [{"type": "image", "url": media["a"]},
                                         {"type": "text", "text": "Describe this image."}]}]
    a, b = run_both(ours, ref_pil, conv)
    assert_same(a, b)
    a, b = run_both(ours, ref, conv)  # 56x84 needs no resize, so the torchvision path agrees too
    assert_same(a, b)


def test_resized_image_pixels_equal_the_pil_processor(ours, ref, ref_pil, media):
    conv = [{"role": "user", "content": [{"type": "image", "path": media["d"]}, {"type": "text", "text": "x"}]}]
    assert_same(*run_both(ours, ref_pil, conv))
    assert_same(*run_both(ours, ref, conv), pixels=False)


def test_video_with_fps_doc_example(ours, ref, media):
    conv = [{"role": "user", "content": [{"type": "video", "path": media["v"]},
                                         {"type": "text", "text": "What happened in the video?"}]}]
    for kwargs in ({"fps": 1}, {"num_frames": 4}, {}):
        assert_same(*run_both(ours, ref, conv, **kwargs))


def batch_of_four(media):
    return [
        [{"role": "user", "content": [{"type": "image", "path": media["a"]},
                                      {"type": "text", "text": "Describe this image."}]}],
        [{"role": "user", "content": [{"type": "image", "path": media["b"]}, {"type": "image", "path": media["c"]},
                                      {"type": "text", "text": "What is written in the pictures?"}]}],
        [{"role": "user", "content": "who are you?"}],
        [{"role": "user", "content": [{"type": "image", "path": media["c"]}, {"type": "image", "path": media["a"]},
                                      {"type": "video", "path": media["v"]},
                                      {"type": "text", "text": "What are the common elements in these medias?"}]}],
    ]


def test_batch_of_four_mixed_conversations_with_padding(ours, ref_pil, media):
    a, b = run_both(ours, ref_pil, batch_of_four(media), fps=1, padding=True)
    assert_same(a, b)
    assert a["attention_mask"][2, 0] == 0 and a["input_ids"][2, 0] == 151643  # left padding


def test_multi_turn_with_vision_ids(ours, ref_pil, media):
    conv = [
        {"role": "user", "content": [{"type": "image", "path": media["b"]}, {"type": "text", "text": "Hello?"}]},
        {"role": "assistant", "content": "I'm doing well."},
        {"role": "user", "content": [{"type": "text", "text": "Describe these."}, {"type": "image", "path": media["a"]},
                                     {"type": "image", "path": media["c"]}, {"type": "video", "path": media["v"]}]},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "It was a trip to the mountains."},
    ]
    for with_id in (False, True):
        assert_same(*run_both(ours, ref_pil, conv, add_vision_id=with_id, fps=2))


def test_openai_blocks_and_base64_sources(ours, ref_pil, media):
    data = base64.b64encode(open(media["b"], "rb").read()).decode()
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                                         {"type": "text", "text": "q"}]}]
    assert_same(*run_both(ours, ref_pil, conv))


def test_direct_call_and_return_types(ours, ref, ref_pil, media):
    images = [Image.open(media["a"]), Image.open(media["d"])]
    text = ["<|vision_start|><|image_pad|><|vision_end|> one", "two <|image_pad|> and more"]
    for return_tensors in ("pt", "np", None):
        a = ours(text=text, images=images, padding=True, return_tensors=return_tensors)
        b = ref_pil(text=text, images=images, padding=True, return_tensors=return_tensors)
        default = ref(text=text, images=images, padding=True, return_tensors=return_tensors)
        assert sorted(a) == sorted(b)
        for key in b:
            # with return_tensors=None pixels come back as the default (torchvision) processor returns them
            assert type(a[key]) is type(default[key]), (key, return_tensors)
            np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=0, atol=1e-6)


def test_pixel_bounds_from_from_pretrained_apply_to_images_and_videos(folder, media):
    bounds = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 4}
    ours = AutoProcessor.from_pretrained(folder, **bounds)
    theirs = transformers.AutoProcessor.from_pretrained(folder, **bounds)
    conv = batch_of_four(media)
    assert_same(*run_both(ours, theirs, conv, fps=1, padding=True), pixels=False)


def test_token_counts_match_get_num_multimodal_tokens(ours, ref):
    image_sizes = [(1, 1), (28, 28), (56, 84), (480, 640), (1080, 1920), (4000, 3000), (30, 5000)]
    video_sizes = [(1, 28, 28), (7, 48, 64), (16, 360, 640), (300, 1080, 1920)]
    counts = ours.count_visual_tokens(image_sizes=image_sizes, video_sizes=video_sizes)
    expected = ref._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes)
    assert counts.num_image_tokens == expected.num_image_tokens
    assert counts.num_image_patches == expected.num_image_patches
    assert counts.num_video_tokens == expected.num_video_tokens
    assert counts.total == sum(expected.num_image_tokens) + sum(expected.num_video_tokens)


def test_conversation_token_count_equals_the_reference_processor(ours, ref, media):
    conversations = batch_of_four(media)
    counted = ours.count_conversation_tokens(conversations, fps=1)
    out = ref.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt", padding=True, fps=1)
    assert counted.total == int((out["mm_token_type_ids"] > 0).sum())
    assert counted.num_video_tokens == [int(g.prod()) // 4 for g in out["video_grid_thw"]]


def test_decoding_helpers_match(ours, ref):
    ids = torch.tensor([[151644, 9707, 11, 1879, 0, 151645], [151643, 151643, 9707, 220, 11, 151645]])
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert ours.post_process_image_text_to_text(ids) == ref.post_process_image_text_to_text(ids)
    assert ours.decode(ids[0], skip_special_tokens=True) == ref.decode(ids[0], skip_special_tokens=True)


def test_placeholder_mismatch_is_an_error_in_both(ours, ref, media):
    image = Image.open(media["a"])
    for processor in (ours, ref):
        with pytest.raises(ValueError, match="2 .*1 images|Found total 2"):
            processor(text=["<|image_pad|><|image_pad|>"], images=[image])


def test_saved_processor_loads_in_transformers(ours, ref_pil, media, tmp_path):
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoProcessor.from_pretrained(tmp_path)
    pil = transformers.Qwen2VLProcessor(image_processor=transformers.Qwen2VLImageProcessorPil.from_pretrained(tmp_path),
                                        tokenizer=theirs.tokenizer, video_processor=theirs.video_processor,
                                        chat_template=theirs.chat_template)
    conv = batch_of_four(media)
    assert_same(*run_both(ours, pil, conv, fps=1, padding=True))
    again = AutoProcessor.from_pretrained(tmp_path)
    assert_same(*run_both(again, ref_pil, conv, fps=1, padding=True))



def test_reads_a_folder_saved_by_transformers(ref, ref_pil, media, tmp_path):
    ref.save_pretrained(tmp_path)  # v5 layout: processor_config.json with nested processor dicts
    assert not (tmp_path / "preprocessor_config.json").exists()
    ours = AutoProcessor.from_pretrained(tmp_path, min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 6)
    theirs = transformers.AutoProcessor.from_pretrained(tmp_path, min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 6)
    assert_same(*run_both(ours, theirs, batch_of_four(media), fps=1, padding=True), pixels=False)

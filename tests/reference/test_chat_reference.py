"""Our chat rendering vs transformers' apply_chat_template(tokenize=False) with the same template."""

import pytest
import transformers
from support.tokenizer import tokenizer, tokenizer_dir

from qwen2vl.processing import chat

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"

# transformers' doc page, "Multiple Image Inputs"
DOC_CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello, how are you?"}]},
    {"role": "assistant", "content": "I'm doing well, thank you for asking. How can I assist you today?"},
    {"role": "user", "content": [
        {"type": "text", "text": "Can you describe these images and video?"},
        {"type": "image"}, {"type": "image"}, {"type": "video"},
        {"type": "text", "text": "These are from my vacation."}]},
    {"role": "assistant", "content": "I'd be happy to describe the images and video for you. "
                                     "Could you please provide more context about your vacation?"},
    {"role": "user", "content": "It was a trip to the mountains. Can you see the details in the images and video?"},
]


def doc_expected(with_id: bool) -> str:
    p = (lambda n: f"Picture {n}: ") if with_id else (lambda n: "")
    v = "Video 1: " if with_id else ""
    return (SYS + f"<|im_start|>user\n{p(1)}{IMG}Hello, how are you?<|im_end|>\n"
            "<|im_start|>assistant\nI'm doing well, thank you for asking. How can I assist you today?<|im_end|>\n"
            f"<|im_start|>user\nCan you describe these images and video?{p(2)}{IMG}{p(3)}{IMG}{v}{VID}"
            "These are from my vacation.<|im_end|>\n<|im_start|>assistant\nI'd be happy to describe the images and "
            "video for you. Could you please provide more context about your vacation?<|im_end|>\n"
            "<|im_start|>user\nIt was a trip to the mountains. Can you see the details in the images and video?"
            "<|im_end|>\n<|im_start|>assistant\n")


CONVERSATIONS = [
    [{"role": "user", "content": "who are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "user", "content": [{"type": "image", "url": "a.png"}, {"type": "text", "text": "Describe."}]}],
    [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}, {"type": "text", "text": "What happened?"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://h/x.png"}},
                                  {"type": "text", "text": "OpenAI style"}]}],
    [{"role": "user", "content": "多轮 👋"}, {"role": "assistant", "content": "好的\n\n"},
     {"role": "user", "content": [{"image": "x"}, {"video": "y"}, {"text": "  spaced  "}]}],
    DOC_CONVERSATION,
]


@pytest.fixture(scope="module")
def ref():
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir())


def test_doc_page_multi_image_examples_give_the_documented_strings(ref):
    for with_id in (False, True):
        ours = tokenizer().apply_chat_template(DOC_CONVERSATION, add_generation_prompt=True,
                                               tokenize=False, add_vision_id=with_id)
        theirs = ref.apply_chat_template(DOC_CONVERSATION, add_generation_prompt=True,
                                         tokenize=False, add_vision_id=with_id)
        assert ours == theirs == doc_expected(with_id)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("options", [{}, {"add_generation_prompt": True}, {"add_vision_id": True},
                                     {"add_generation_prompt": True, "add_vision_id": True}])
def test_render_matches_transformers(ref, index, options):
    conversation = CONVERSATIONS[index]
    ours = tokenizer().apply_chat_template(conversation, tokenize=False, **options)
    assert ours == ref.apply_chat_template(conversation, tokenize=False, **options)


def test_builtin_template_equals_the_built_folders_template(ref):
    assert ref.chat_template == chat.QWEN2_VL_CHAT_TEMPLATE


def test_batched_tokenized_chat_matches_transformers(ref):
    batch = CONVERSATIONS[:3]
    ours = tokenizer().apply_chat_template(batch, add_generation_prompt=True, padding=True,
                                           return_tensors="pt", return_dict=True)
    theirs = ref.apply_chat_template(batch, add_generation_prompt=True, padding=True,
                                     return_tensors="pt", return_dict=True)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()


def test_chat_template_override_matches_transformers(ref):
    tpl = ("{% for m in messages %}{{ bos_token or '' }}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}<a>{% endif %}{{ eos_token }}")
    conv = CONVERSATIONS[0]
    ours = tokenizer().apply_chat_template(conv, chat_template=tpl, tokenize=False, add_generation_prompt=True)
    assert ours == ref.apply_chat_template(conv, chat_template=tpl, tokenize=False, add_generation_prompt=True)

"""Chat-template rendering: the Qwen2-VL-Instruct rules of reference-notes §7.2, template lookup, errors."""

import json

import pytest

from qwen2vl.errors import ChatTemplateError
from qwen2vl.processing import chat

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def render(conversation, **kwargs):
    return chat.render_conversations([conversation], chat.QWEN2_VL_CHAT_TEMPLATE, **kwargs)[0]


def test_string_content_gets_default_system_turn_and_generation_prompt():
    out = render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert out == SYS + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_explicit_system_message_replaces_the_default():
    out = render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_list_content_items_are_concatenated_without_separators():
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."},
                                        {"type": "video"}, {"type": "text", "text": " Now."}]}]
    assert render(msg) == SYS + f"<|im_start|>user\n{IMG}Describe.{VID} Now.<|im_end|>\n"


def test_vision_ids_count_over_the_whole_conversation():
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"image_url": "x"}, {"video": "v"}]}]
    out = render(conv, add_vision_id=True)
    assert out == (SYS + f"<|im_start|>user\nPicture 1: {IMG}a<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
                   f"<|im_start|>user\nPicture 2: {IMG}Video 1: {VID}Picture 3: {IMG}Video 2: {VID}<|im_end|>\n")
    assert "Picture" not in render(conv)


def test_keys_image_and_image_url_mark_images_without_type():
    conv = [{"role": "user", "content": [{"image": "a.png"}, {"image_url": "b.png"}, {"text": "t"}, {"other": 1}]}]
    assert render(conv) == SYS + f"<|im_start|>user\n{IMG}{IMG}t<|im_end|>\n"


def test_openai_image_url_blocks_and_none_keys_are_normalised():
    conv = [{"role": "user", "name": None,
             "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}, {"type": "text", "text": "q"}]}]
    messages = chat.normalize_conversation(conv)
    assert messages == [{"role": "user", "content": [{"type": "image", "url": "http://x/a.png"},
                                                    {"type": "text", "text": "q"}]}]
    assert conv[0]["content"][0]["type"] == "image_url"  # the caller's dict is untouched


def test_batched_detection():
    one = [{"role": "user", "content": "a"}]
    assert chat.is_batched([one, one]) and not chat.is_batched(one)


def test_custom_template_and_template_variables():
    tpl = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}{{ eos_token }}"
    out = chat.render_conversations([[{"role": "user", "content": "x"}]], tpl, eos_token="<E>")
    assert out == ["[user:x]<E>"]


def test_sandbox_helpers_tojson_and_trim_blocks():
    tpl = "{% for m in messages %}\n{{ m | tojson }}\n{% endfor %}"
    out = chat.render_conversations([[{"role": "user", "content": "é<>"}]], tpl)
    assert out == ['{"role": "user", "content": "é<>"}\n']


def test_raise_exception_names_the_conversation():
    tpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    good, bad = [{"role": "user", "content": "a"}], [{"role": "assistant", "content": "a"}]
    with pytest.raises(ChatTemplateError, match=r"conversations\[1\].*first must be user"):
        chat.render_conversations([good, bad], tpl)


def test_template_syntax_error_is_a_chat_template_error():
    with pytest.raises(ChatTemplateError, match="line 1"):
        chat.render_conversations([[{"role": "user", "content": "a"}]], "{% for %}")


def test_sandbox_blocks_attribute_escapes():
    tpl = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        chat.render_conversations([[{"role": "user", "content": "a"}]], tpl)


def test_malformed_messages_name_their_index():
    with pytest.raises(ChatTemplateError, match=r"conversations\[0\]\.messages\[1\]"):
        chat.normalize_conversation([{"role": "user", "content": "a"}, "oops"])
    with pytest.raises(ChatTemplateError, match=r"conversations\[2\]\.messages\[0\]: 'role'"):
        chat.validate_messages([{"content": "a"}], index=2)
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\.content\[1\]"):
        chat.validate_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, 3]}])


def test_media_objects_become_placeholders_for_the_template():
    class Picture:
        pass
    tpl = "{{ messages[0]['content'][0]['image'] }}"
    assert chat.render_conversations([[{"role": "user", "content": [{"image": Picture()}]}]], tpl) == ["<Picture>"]


def test_load_chat_template_precedence(tmp_path):
    assert chat.load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from-config"}))
    assert chat.load_chat_template(tmp_path) == "from-config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from-json"}))
    assert chat.load_chat_template(tmp_path) == "from-json"
    (tmp_path / "chat_template.jinja").write_text("from-jinja")
    assert chat.load_chat_template(tmp_path) == "from-jinja"


def test_named_template_list_uses_default(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert chat.load_chat_template(tmp_path) == "D"

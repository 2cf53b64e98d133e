"""Chat-template rendering in a jinja2 sandbox, conversation normalisation and template lookup.

Imports only errors (jinja2 is a core dependency).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from qwen2vl.errors import ChatTemplateError

# Qwen2-VL-Instruct's rules (reference-notes §7.2): a default system turn, `<|im_start|>role\n ... <|im_end|>\n`,
# one vision block per image/video item (optionally numbered over the conversation), text items verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """Compile `template` in an immutable sandbox with the helpers hub templates expect."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text; we render the body unchanged
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat prompts must not contain
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat_template: line {exc.lineno}: {exc.message}; fix the template's jinja syntax"
        ) from None


@functools.lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """Names the template reads from its context (so other keyword arguments can go elsewhere)."""
    import jinja2
    from jinja2 import meta

    try:
        return frozenset(meta.find_undeclared_variables(compile_template(template).environment.parse(template)))
    except jinja2.exceptions.TemplateSyntaxError:
        return frozenset()


def _plain(value: Any) -> Any:
    """Copy of template input made of JSON types only; media objects become `<TypeName>` placeholders."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def is_batched(conversation: Any) -> bool:
    """True for a list of conversations, False for one conversation (a list of messages)."""
    return (
        isinstance(conversation, (list, tuple))
        and len(conversation) > 0
        and isinstance(conversation[0], (list, tuple))
    )


def normalize_conversation(conversation: Sequence[Any], index: int = 0) -> list[dict]:
    """Drop None-valued keys and rewrite OpenAI `image_url` blocks as `{"type": "image", "url": ...}`."""
    if not isinstance(conversation, (list, tuple)):
        raise ChatTemplateError(
            f"conversations[{index}]: expected a list of messages, got {type(conversation).__name__}; "
            "pass [{'role': ..., 'content': ...}, ...]"
        )
    messages = []
    for m, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"conversations[{index}].messages[{m}]: expected a dict with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        message = {key: value for key, value in message.items() if value is not None}
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            message["content"] = [_openai_block(block) for block in content]
        messages.append(message)
    return messages


def _openai_block(block: Any) -> Any:
    if isinstance(block, Mapping) and block.get("type") == "image_url" and "image_url" in block:
        info = block["image_url"]
        url = info.get("url", "") if isinstance(info, Mapping) else info
        return {"type": "image", "url": url}
    return block


def render_conversations(
    conversations: Sequence[Sequence[Mapping]],
    template: str,
    add_generation_prompt: bool = False,
    **template_kwargs: Any,
) -> list[str]:
    """Render each conversation with `template`; errors name the conversation index."""
    import jinja2

    compiled = compile_template(template)
    extra = _plain(template_kwargs)
    rendered = []
    for i, conversation in enumerate(conversations):
        messages = normalize_conversation(conversation, i)
        validate_messages(messages, i)
        messages = _plain(messages)
        try:
            rendered.append(compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra))
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"conversations[{i}]: the chat template failed: {exc}") from None
        except (TypeError, AttributeError, KeyError) as exc:
            raise ChatTemplateError(
                f"conversations[{i}]: the chat template cannot render these messages ({exc}); "
                "each message needs 'role' and 'content' (a string or a list of typed blocks)"
            ) from None
    return rendered


def validate_messages(conversation: Sequence[Mapping], index: int = 0) -> None:
    """Check the shape the Qwen2-VL template needs: role strings and string-or-list content."""
    for m, message in enumerate(conversation):
        where = f"conversations[{index}].messages[{m}]"
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"{where}: 'role' is missing or not a string ({message.get('role')!r}); "
                                    "use 'system', 'user' or 'assistant'")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise ChatTemplateError(f"{where}: 'content' is {type(content).__name__}; "
                                    "use a string or a list of {'type': ...} blocks")
        if isinstance(content, (list, tuple)):
            for c, block in enumerate(content):
                if not isinstance(block, Mapping):
                    raise ChatTemplateError(f"{where}.content[{c}]: expected a dict block, got "
                                            f"{type(block).__name__}; use {{'type': 'text', 'text': ...}}")


def load_chat_template(directory: str | Path) -> str | None:
    """The checkpoint's own template: chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    folder = Path(directory)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
                template = {t["name"]: t["template"] for t in template}
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                return template
    return None

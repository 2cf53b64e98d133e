"""model/attention.py: every backend against eager (the numerical reference) and the backend registry."""

import importlib.util

import pytest
import torch

from qwen2vl.errors import ConfigError
from qwen2vl.model.attention import BACKENDS, attention, check_backend, repeat_kv, varlen_attention


def _qkv(b=2, h=4, hkv=2, lq=5, lk=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def _naive(q, k, v, mask, scale):
    """Textbook softmax(q k^T * scale + mask) v with -inf for masked keys, in float64."""
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1])
    scores = (q.double() @ k.double().transpose(2, 3)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.double()).transpose(1, 2)


def test_check_backend():
    assert check_backend(None) == "sdpa"
    assert set(BACKENDS) == {"sdpa", "eager", "flash_attention_2"}
    with pytest.raises(ConfigError, match="'magic' is unknown; use one of"):
        check_backend("magic")


def test_flash_unavailable_names_package_and_alternatives():
    if importlib.util.find_spec("flash_attn") is not None:
        assert check_backend("flash_attention_2") == "flash_attention_2"
        return
    with pytest.raises(ConfigError, match="flash_attn.*'sdpa' or 'eager'"):
        check_backend("flash_attention_2")


def test_eager_matches_textbook_attention_with_padding_mask():
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False
    mask[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # pad queries see only themselves
    out, weights = attention(q, k, v, mask=mask, scale=0.3, backend="eager")
    assert torch.allclose(out.double(), _naive(q, k, v, mask, 0.3), atol=1e-6)
    assert weights.shape == (2, 4, 5, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 5))


@pytest.mark.parametrize("case", ["causal", "mask", "decode", "none"])
def test_sdpa_matches_eager(case):
    lq = 1 if case == "decode" else 5
    q, k, v = _qkv(lq=lq, lk=5)
    mask = None
    if case == "mask":
        mask = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
        mask |= torch.eye(5, dtype=torch.bool)
    causal = case in ("causal", "decode")
    ref, _ = attention(q, k, v, mask=mask, scale=0.35, backend="eager", causal=causal)
    out, weights = attention(q, k, v, mask=mask, scale=0.35, backend="sdpa", causal=causal)
    assert weights is None
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("bounds", [
    [0, 6, 12, 16, 20],  # two lengths, each group back to back: views
    [0, 6, 10, 16, 20],  # equal lengths apart (6 at 0 and 10, 4 at 6 and 16): gathered
    [0, 20],  # one segment: the whole sequence
])
def test_varlen_equals_per_segment_eager(bounds):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(20, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor(bounds, dtype=torch.int32)
    expected = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg, _ = attention(*(x[s:e].transpose(0, 1)[None] for x in (q, k, v)), mask=None, scale=0.5, backend="eager")
        expected.append(seg[0])
    for backend in ("eager", "sdpa"):
        out = varlen_attention(q, k, v, cu, scale=0.5, backend=backend)
        assert torch.allclose(out, torch.cat(expected), atol=1e-6)


def test_varlen_is_block_diagonal():
    """Changing one segment's keys must not change another segment's output."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8, 1, 4, generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    before = varlen_attention(q, k, v, cu, scale=1.0)
    k2 = k.clone()
    k2[4:] = torch.randn(4, 1, 4, generator=g)
    after = varlen_attention(q, k2, v, cu, scale=1.0)
    assert torch.equal(before[:4], after[:4])
    assert not torch.allclose(before[4:], after[4:])

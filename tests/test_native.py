"""qwen2vl.native: the C int8 kernel built on first use, and what happens when it cannot be built.

Expected values come from first principles: float64 matrix products of the same int8 values, and
torch's own fp32 -> bf16 rounding (nearest, ties to even) for the kernel's output conversion.
"""

import logging

import pytest
import torch

from qwen2vl.native import build, int8


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build with an empty cache directory; the real cached library comes back afterwards."""
    monkeypatch.setenv("QWEN2VL_CACHE_DIR", str(tmp_path))
    build.load.cache_clear()
    yield tmp_path
    build.load.cache_clear()


def _operands(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g)
    return x, q, scales, bias


def test_the_kernel_builds_where_there_is_a_compiler():
    # a broken build would only log a warning and silently slow the int8 mode down
    if build.find_compiler() is None:
        pytest.skip("no C compiler on this machine: the fallback tests below cover it")
    assert int8.available()


@pytest.mark.parametrize("m,n,k", [(1, 300, 1536), (1, 7, 100), (3, 257, 1540), (8, 96, 8960), (5, 1, 64),
                                   (11, 33, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_kernel_equals_the_float64_product(m, n, k, with_bias):
    x, q, scales, bias = _operands(m, n, k)
    bias = bias if with_bias else None
    expected = (x.double() @ q.double().T) * scales.double() + (0 if bias is None else bias.double())
    got = int8.q8_linear(x, q, scales, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # fp32 sums of k products of size <= 127 * |x|: a few fp32 ulps of the sum of magnitudes
    bound = (x.double().abs() @ q.double().abs().T) * scales.double() * 8 * 2.0 ** -23 * k ** 0.5
    assert bool(((got.double() - expected).abs() <= bound + 1e-6).all())


@pytest.mark.parametrize("m,n,k", [(1, 300, 1536), (4, 65, 960)])
def test_bf16_kernel_rounds_the_fp32_result_once(m, n, k):
    x, q, scales, bias = _operands(m, n, k, seed=1)
    xb, bb = x.bfloat16(), bias.bfloat16()
    exact = (xb.double() @ q.double().T) * scales.double() + bb.double()
    got = int8.q8_linear(xb, q, scales, bb)
    assert got.dtype == torch.bfloat16
    # one rounding to bf16 (half an ulp: 2^-9 relative) on top of fp32 sums
    assert bool(((got.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-4).all())


def test_bf16_output_rounding_is_torchs():
    """K = 1, q = 1, x = 1: y[n] is scale[n] converted to bf16, which must be torch's conversion."""
    values = torch.tensor([1.0, 1.00390625, 1.01171875, -1.00390625, 3.0e38, -3.4e38, 1e-40, 0.0, -0.0,
                           float("inf"), float("-inf"), float("nan"), 0.1, 123.456, -7.7e-5])
    values = torch.cat([values, torch.randn(2000, generator=torch.Generator().manual_seed(3)) * 100])
    q = torch.ones(values.numel(), 1, dtype=torch.int8)
    got = int8.q8_linear(torch.ones(1, 1, dtype=torch.bfloat16), q, values)
    torch.testing.assert_close(got[0], values.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)


def test_one_thread_gives_the_same_result():
    x, q, scales, bias = _operands(2, 129, 512, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8.q8_linear(x, q, scales, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, int8.q8_linear(x, q, scales, bias))


def test_supports_refuses_what_the_kernel_cannot_take():
    x, q, _, bias = _operands(2, 8, 64)
    assert int8.supports(x, q, bias)
    assert not int8.supports(x.half(), q, None)  # fp16 activations
    assert not int8.supports(x, q, bias.bfloat16())  # bias in another dtype
    assert not int8.supports(x[:, :32], q, None)  # K mismatch
    assert not int8.supports(x, q.float(), None)
    assert not int8.supports(x.requires_grad_(), q, None)  # autograd needs the torch path


def test_build_is_cached_per_source_and_machine(fresh_build):
    assert build.load("q8_linear") is not None
    built = list((fresh_build / "native").glob("q8_linear-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    build.load.cache_clear()
    assert build.load("q8_linear") is not None
    assert [p.stat().st_mtime_ns for p in (fresh_build / "native").glob("q8_linear-*.so")] == [stamp]
    assert not list((fresh_build / "native").glob("tmp*"))  # no half-written files left behind


def test_no_compiler_means_the_torch_path_and_a_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="qwen2vl.native.build"):
        assert build.load("q8_linear") is None
    assert "q8_linear" in caplog.text and "using the torch path" in caplog.text
    x, q, _, _ = _operands(1, 4, 64)
    assert not int8.available() and not int8.supports(x, q, None)


def test_a_failing_compiler_means_the_torch_path(fresh_build, monkeypatch, caplog):
    fake = fresh_build / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: unsupported option' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with caplog.at_level(logging.WARNING, logger="qwen2vl.native.build"):
        assert build.load("q8_linear") is None
    assert "unsupported option" in caplog.text
    assert not list((fresh_build / "native").glob("*.so"))


def test_disabled_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("QWEN2VL_NATIVE", "0")
    assert build.load("q8_linear") is None
    assert not (fresh_build / "native").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_q_times_scale_rounded_once(dtype):
    _, q, scales, _ = _operands(1, 37, 300, seed=5)
    expected = (q.float() * scales[:, None]).to(dtype)  # fp32 product (exact for |q| <= 127), one rounding
    got = int8.dequantize(q, scales, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_dequantize_reuses_one_buffer_per_thread(monkeypatch):
    _, q, scales, _ = _operands(1, 16, 64)
    first = int8.dequantize(q, scales, torch.bfloat16).data_ptr()
    assert int8.dequantize(q[:8], scales[:8], torch.bfloat16).data_ptr() == first  # smaller: same buffer
    monkeypatch.setattr(int8, "_SCRATCH_MAX_BYTES", 100)  # above the cap: a tensor of its own
    assert int8.dequantize(q, scales, torch.bfloat16).data_ptr() != first


# ------------------------------------------------------------------------------------------ rotary
from qwen2vl.model import rope  # noqa: E402
from qwen2vl.native import rotary  # noqa: E402


def _torch_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's vision rotary: in fp32, then back to bf16."""
    return rope.apply_rotary(x.float(), cos[:, None], sin[:, None]).to(torch.bfloat16)


@pytest.mark.parametrize("n,h,d", [(37, 16, 80), (1, 1, 2), (300, 3, 64)])
def test_rotary_is_bit_identical_to_the_torch_ops(n, h, d):
    g = torch.Generator().manual_seed(n)
    qkv = (torch.randn(n, 3 * h * d, generator=g) * 4).to(torch.bfloat16)
    q, k, _ = qkv.view(n, 3, h, d).unbind(1)  # strided views, as out of the fused qkv projection
    angles = torch.randn(n, d // 2, generator=g) * 40
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    for x in (q, k, q.contiguous()):
        assert rotary.supports(x, cos, sin)
        got = rotary.rotary_bf16(x, cos, sin)
        assert got.is_contiguous() and torch.equal(got, _torch_rotary(x, cos, sin))


def test_rotary_special_values_match_the_torch_ops():
    x = torch.tensor([[[1.0, float("inf"), float("nan"), -0.0, 3e38, 1e-40]]]).to(torch.bfloat16)
    x = x.repeat(4, 2, 1)
    cos = torch.tensor([0.5, -1.0, 2.0, 1e-30, 1.0, 0.25]).repeat(4, 1)
    sin = torch.tensor([-0.5, 0.0, 3.0, 7.0, -2.0, 1e30]).repeat(4, 1)
    torch.testing.assert_close(rotary.rotary_bf16(x, cos, sin), _torch_rotary(x, cos, sin),
                               rtol=0, atol=0, equal_nan=True)


def test_rotary_supports_refuses_other_layouts():
    x, cs = torch.zeros(4, 2, 8, dtype=torch.bfloat16), torch.zeros(4, 8)
    assert rotary.supports(x, cs, cs)
    assert not rotary.supports(x.float(), cs, cs)  # fp32 activations: the torch path
    assert not rotary.supports(x.transpose(1, 2), cs[:, :2], cs[:, :2])  # last dim not contiguous
    assert not rotary.supports(x, cs.bfloat16(), cs.bfloat16())
    assert not rotary.supports(x.requires_grad_(), cs, cs)


def test_vision_tower_gives_the_same_bits_with_and_without_the_kernel(monkeypatch):
    from support.checkpoints import tiny_model

    tower = tiny_model().model.visual.to(torch.bfloat16).eval()
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = tower(pixels.to(torch.bfloat16), grid).pooler_output
        monkeypatch.setenv("QWEN2VL_NATIVE", "0")
        build.load.cache_clear()
        assert not rotary.supports(torch.zeros(1, 1, 2, dtype=torch.bfloat16), torch.zeros(1, 2), torch.zeros(1, 2))
        plain = tower(pixels.to(torch.bfloat16), grid).pooler_output
    build.load.cache_clear()
    assert torch.equal(fused, plain)


def test_editing_a_shared_header_rebuilds(fresh_build, monkeypatch, tmp_path):
    """The libraries include bf16.h: a changed header must not load the library built from the old one."""
    src = tmp_path / "src"
    src.mkdir()
    for f in build.SOURCE_DIR.glob("*.[ch]"):
        (src / f.name).write_text(f.read_text())
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    assert build.load("rotary") is not None
    (src / "bf16.h").write_text((src / "bf16.h").read_text() + "\n/* edited */\n")
    build.load.cache_clear()
    assert build.load("rotary") is not None
    assert len(list((fresh_build / "native").glob("rotary-*.so"))) == 2

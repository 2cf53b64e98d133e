"""qwen2vl.quantize: the int8 weight-only Linear swap on tiny models.

Expected values come from first principles: the int8 layer must compute x @ (q * scale).T exactly
(to float rounding), the quantised model must equal a plain model holding the dequantised weights,
and its logits must stay within the stated tolerance of the unquantised model.
"""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from qwen2vl.native import build as native_build
from qwen2vl.quantize import Int8Linear, quantize_int8, quantize_weight_int8
from support.checkpoints import tiny_model

# Tolerance of the int8 model against the model it was made from: per-row symmetric int8 rounds
# each weight by at most max|w_row|/254, which moves these tiny models' logits by < 3% of their range.
INT8_LOGIT_TOL = 0.03


def _inputs(batch: int = 2, length: int = 7, vocab: int = 240) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _dequantised_copy(model: nn.Module) -> nn.Module:
    """The quantised model with each Int8Linear replaced by a plain Linear holding q * scale."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, Int8Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear = linear.to(module.scales.dtype)
            linear.weight.data = module.dequantize(torch.float32).to(module.scales.dtype)
            if module.bias is not None:
                linear.bias.data = module.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, linear)
    return plain


def test_quantize_weight_int8_matches_hand_computation():
    w = torch.tensor([[1.27, -0.635, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0], [-2.54, 1.0, 0.5, 2.0]])
    q, scales = quantize_weight_int8(w, torch.float32)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    torch.testing.assert_close(scales[[0, 2]], torch.tensor([0.01, 0.02]))
    assert q[0].tolist() == [127, -64, 0, 30]  # -63.5 rounds half to even -> -64
    assert q[1].tolist() == [0, 0, 0, 0]  # an all-zero row stays zero (scale clamped above 0)
    assert q[2].tolist() == [-127, 50, 25, 100]
    err = (q.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())


def test_quantize_weight_int8_chunks_do_not_change_the_result():
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    q1, s1 = quantize_weight_int8(w, torch.bfloat16, chunk_rows=5)
    q2, s2 = quantize_weight_int8(w, torch.bfloat16, chunk_rows=4096)
    assert torch.equal(q1, q2) and torch.equal(s1, s2)


@pytest.fixture(params=["native", "torch"])
def kernel(request, monkeypatch):
    """Run a test with our C kernel (<= 8 rows), and again as on a machine without a C compiler
    (torch's int8 kernel for <= 2 rows, the portable dequantising path above)."""
    if request.param == "torch":
        monkeypatch.setenv("QWEN2VL_NATIVE", "0")
    native_build.load.cache_clear()
    yield request.param
    native_build.load.cache_clear()


def test_int8_linear_computes_x_times_dequantised_weight(kernel):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    layer = Int8Linear.from_linear(linear)
    w = layer.weight_int8.double() * layer.scales.double()[:, None]
    for rows in (1, 2, 3, 5):  # 3 * rows activation rows: native up to 8, then the portable path
        x = torch.randn(rows, 3, 64)
        expected = x.double() @ w.T + linear.bias.double()
        out = layer(x)
        assert out.shape == (rows, 3, 48) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_int8_linear_bf16_kernel_and_fallback_agree_to_bf16_rounding(kernel):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(96, 32, bias=True).to(torch.bfloat16))
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    w = layer.weight_int8.double() * layer.scales.double()[:, None]
    expected = x.double() @ w.T + layer.bias.double()
    for out in (layer(x), layer(x.expand(4, 96))[:1], layer(x.expand(20, 96))[:1]):  # 1, 4, 20 rows
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_quantize_int8_swaps_text_linears_only():
    model = tiny_model(tied=True)
    embed = model.model.language_model.embed_tokens.weight
    vision_before = {n for n, m in model.model.visual.named_modules() if isinstance(m, nn.Linear)}
    quantize_int8(model)
    text = model.model.language_model
    for layer in text.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                     layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert isinstance(proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.weight is embed  # tied: the shared matrix is kept, not copied
    assert text.embed_tokens.weight is embed and text.embed_tokens.weight.dtype == torch.float32
    vision_after = {n for n, m in model.model.visual.named_modules() if isinstance(m, nn.Linear)}
    assert vision_after == vision_before  # the vision tower is untouched


def test_quantize_int8_can_keep_lm_head():
    model = quantize_int8(tiny_model(), include_lm_head=False)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Int8Linear)


def test_int8_logits_close_to_unquantised_and_equal_to_dequantised_model(kernel):
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(tied=False).to(dtype)
        ids = _inputs()
        with torch.no_grad():
            ref = model(input_ids=ids).logits.float()
            quantize_int8(model)
            got = model(input_ids=ids).logits.float()
            plain = _dequantised_copy(model)(input_ids=ids).logits.float()
        assert got.shape == ref.shape == (2, 7, 256)
        spread = (ref.max() - ref.min()).item()
        assert (got - ref).abs().max().item() <= INT8_LOGIT_TOL * spread
        tol = 1e-4 if dtype == torch.float32 else 0.05 * spread
        assert (got - plain).abs().max().item() <= tol


def test_generate_runs_after_quantisation_and_matches_dequantised_model(kernel):
    model = tiny_model(tied=True)
    quantize_int8(model)
    plain = _dequantised_copy(model)
    ids = _inputs(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate(input_ids=ids, **kwargs)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, :5], ids)
    assert torch.equal(out, plain.generate(input_ids=ids, **kwargs))


def test_int8_on_a_loaded_checkpoint_keeps_outputs(tmp_path):
    """Weights mmap'd from safetensors (and prepacked by from_pretrained): quantising reads them back
    from the file, and the int8 model equals its dequantised twin."""
    from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration

    tiny_model(tied=False).to(torch.bfloat16).save_pretrained(tmp_path)
    ids = _inputs()
    with torch.no_grad():
        model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        ref = model(input_ids=ids).logits
        expected = _dequantised_copy(quantize_int8(copy.deepcopy(model)))(input_ids=ids).logits
        got = quantize_int8(model)(input_ids=ids).logits
    spread = (ref.float().max() - ref.float().min()).item()
    assert (got.float() - expected.float()).abs().max().item() <= 0.05 * spread
    # the untied head's mmap'd matrix stays reachable (model.device / dtype, state_dict) after the swap
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight.shape == (256, 64)
    out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 9)


def test_an_edited_embedding_is_not_released(tmp_path):
    from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration

    tiny_model(tied=True).to(torch.bfloat16).save_pretrained(tmp_path)
    ids = _inputs()
    with torch.no_grad():
        model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        embed = model.model.language_model.embed_tokens.weight
        embed[120:130] += 1.0  # in-place edit of a private mapping: differs from the file now
        edited = embed.detach().clone()
        ref = model(input_ids=ids).logits
        quantize_int8(model)
        assert torch.equal(model.model.language_model.embed_tokens.weight, edited)
        got = model(input_ids=ids).logits
    spread = (ref.float().max() - ref.float().min()).item()
    assert (got.float() - ref.float()).abs().max().item() <= INT8_LOGIT_TOL * spread


def test_scales_follow_an_in_place_edit():
    """The kernel reads an fp32 copy of the scales; editing the buffer must not leave it stale."""
    layer = Int8Linear.from_linear(nn.Linear(64, 16, bias=False))
    x = torch.randn(1, 64)
    before = layer(x)
    with torch.no_grad():
        layer.scales.mul_(2.0)
    torch.testing.assert_close(layer(x), before * 2.0)


def test_a_portable_build_leaves_decode_to_torchs_kernel(monkeypatch):
    """Where the kernel was built without AVX2/AVX-512 (slower than torch's int8 kernel), few-row calls
    go to torch; many-row calls still dequantise natively."""
    from qwen2vl.native import int8 as native_int8

    monkeypatch.setattr(native_int8, "fast_few_rows", lambda: False)
    monkeypatch.setattr(native_int8, "q8_linear", lambda *a: pytest.fail("q8_linear called"))
    layer = Int8Linear.from_linear(nn.Linear(64, 16, bias=True).to(torch.bfloat16))
    w = layer.weight_int8.double() * layer.scales.double()[:, None]
    for rows in (1, 12):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x).double(), x.double() @ w.T + layer.bias.double(), rtol=2e-2, atol=2e-2)


def test_this_machines_build_is_the_fast_one():
    from qwen2vl.native import build, int8 as native_int8

    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if build.find_compiler() is None or not any(f in flags for f in (" avx2", " avx512f")):
        pytest.skip("no compiler or no AVX2 here: the portable build is used, see the test above")
    assert native_int8.fast_few_rows()

"""model/linear.py and weights.prepack_for_cpu: the prepacked CPU path is bit-identical to F.linear,
is used only when no gradient is wanted and the weight is unchanged, and from_pretrained applies it
in bf16 without touching state_dict, saving or fine-tuning.

Expected values come from F.linear on the same weights (first principles: the packed copy is a
re-layout, so the matmul must give the same bits)."""

import pytest
import torch
import torch.nn.functional as F
from support.checkpoints import tiny_model

from qwen2vl.model import linear as linear_module
from qwen2vl.model.linear import Linear, can_prepack
from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration
from qwen2vl.weights import prepack_for_cpu

pytestmark = pytest.mark.skipif(not can_prepack(), reason="this torch build has no oneDNN prepacking")


def _linear(n_out: int, n_in: int, bias: bool = True, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    return Linear(n_in, n_out, bias=bias).to(torch.bfloat16)


def _packable(layer: Linear) -> bool:
    """Whether the probe found the packed kernel exact for this layer's shape on this machine."""
    return linear_module._EXACT_ROWS.get(linear_module._probe_key(layer.weight, layer.bias), 0) > 0


def _text_and_vision_linears(model) -> tuple[list[Linear], list[Linear]]:
    """The Linear layers outside the vision tower, and those inside it (never packed: its calls have
    hundreds of rows, where the packed kernel is not used)."""
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    return ([m for name, m in named if "visual" not in name.split(".")],
            [m for name, m in named if "visual" in name.split(".")])


@pytest.mark.parametrize("rows", [1, 3, 8, 32, 57, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_forward_is_bit_identical_to_f_linear(rows, bias):
    layer = _linear(96, 64, bias=bias)
    x = torch.randn(2, rows, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    expected = F.linear(x, layer.weight, layer.bias)
    assert layer.prepack() == layer.is_packed == _packable(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


@pytest.fixture
def always_exact(monkeypatch):
    """For tests of the bookkeeping (blocks, staleness, .to()): pack whatever this machine's probe says."""
    monkeypatch.setattr(linear_module, "_exact_rows", lambda packed, weight, bias: 32)


def test_a_weight_taller_than_one_pack_block_is_packed_in_blocks(always_exact):
    layer = _linear(32768 + 100, 16, bias=False)  # two blocks, like the 151,936-row vocabulary (five)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    released = []
    assert layer.prepack(release=lambda rows: released.append(rows.shape[0]))
    assert released == [32768, 100]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))  # (exact where the probe passes)


def test_gradients_flow_through_f_linear_and_a_stale_pack_is_never_used(always_exact):
    layer = _linear(8, 16)
    assert layer.prepack()
    x = torch.randn(4, 16).to(torch.bfloat16)
    layer(x).float().sum().backward()  # grad enabled + requires_grad: the autograd path
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step: the version counter moves
        assert not layer.is_packed
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.data = torch.zeros_like(layer.weight)  # a new tensor altogether
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_only_cpu_bf16_weights_are_packed_and_to_drops_the_pack(always_exact):
    assert not Linear(4, 4).prepack()  # fp32: F.linear is already fast there
    layer = _linear(4, 4)
    assert layer.prepack()
    layer.to(torch.float32)
    assert not layer.is_packed and layer._packed is None
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_prepack_for_cpu_keeps_a_whole_model_bit_identical():
    model = tiny_model(tied=True).to(torch.bfloat16).eval()
    ids = torch.randint(3, 240, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        linears, vision = _text_and_vision_linears(model)
        assert prepack_for_cpu(model, only_mapped=True) == 0  # built in memory: nothing is mmap'd
        count = prepack_for_cpu(model)  # the text decoder and the tied head, where the probe passes
        assert count == sum(m.is_packed for m in linears) == sum(_packable(m) for m in linears) >= 1
        assert vision and not any(m.is_packed for m in vision)
        assert torch.equal(model(input_ids=ids).logits, ref)


@pytest.mark.parametrize("tied", [True, False])
def test_from_pretrained_prepacks_bf16_and_keeps_weights_saving_and_training(tmp_path, tied):
    source = tiny_model(tied=tied).to(torch.bfloat16)
    source.save_pretrained(tmp_path / "src")
    ids = torch.randint(3, 240, (2, 7), generator=torch.Generator().manual_seed(1))
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    plain = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "src", dtype=torch.bfloat16,
                                                            cpu_prepack=False)
    linears, vision = _text_and_vision_linears(model)
    assert [m.is_packed for m in linears] == [_packable(m) for m in linears] and any(_packable(m) for m in linears)
    assert vision and not any(m.is_packed for m in vision)
    assert not any(m.is_packed for m in plain.modules() if isinstance(m, Linear))
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, expected)
    # the weights are still the checkpoint's (read back from the file after their pages were released)
    reference = source.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())
    model.save_pretrained(tmp_path / "again")
    again = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "again", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)
    # one training step works (autograd path), and afterwards no-grad forwards use the new weights
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
        assert not model.lm_head.is_packed
        assert not torch.equal(model(input_ids=ids).logits, expected)
        plain.load_state_dict(model.state_dict())
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_from_pretrained_in_fp32_packs_nothing(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert not any(m.is_packed for m in model.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("shape", [(8960, 1536), (1536, 8960), (256, 1536)])
def test_at_2b_shapes_every_row_count_matches_f_linear(shape):
    """The packed kernel runs for at most `_packed_rows` rows, a limit probed on this machine (or not at
    all where even one row rounds differently); below and above it (F.linear on a plain copy) the
    bits equal F.linear's at the 2B model's shapes."""
    layer = _linear(*shape, bias=shape[0] == 256)
    if layer.prepack():
        assert 1 <= layer._packed_rows <= 32
    for rows in (1, 2, 5, 8, 16, 31, 32, 33, 64, 200):
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)), rows


def test_the_probe_refuses_a_kernel_that_rounds_differently():
    weight = (torch.randn(48, 40) * 0.1).to(torch.bfloat16)
    other = torch.ops.mkldnn._reorder_linear_weight((weight.float() * 1.01).to(torch.bfloat16), 1024)
    assert linear_module._exact_rows(other, weight, None) == 0
    assert linear_module._exact_rows(torch.ops.mkldnn._reorder_linear_weight(weight, 1024), weight[:47], None) == 0


def test_a_packed_layer_deep_copies_and_pickles_unpacked(always_exact):
    import copy
    import pickle

    layer = _linear(8, 16)
    assert layer.prepack()
    x = torch.randn(3, 16).to(torch.bfloat16)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not clone.is_packed and layer.is_packed
        with torch.no_grad():
            assert torch.equal(clone(x), F.linear(x, layer.weight, layer.bias))


def test_a_shape_already_refused_is_not_packed_again(monkeypatch):
    """Every down_proj of a model shares one shape: once the probe refused it, the others skip the
    reorder (and leave their pages alone)."""
    layer = _linear(24, 40)
    monkeypatch.setitem(linear_module._EXACT_ROWS, linear_module._probe_key(layer.weight, layer.bias), 0)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", None, raising=False)
    released = []
    assert not layer.prepack(release=released.append)
    assert released == [] and not layer.is_packed

"""model/text.py: RMSNorm cast order and activations from first principles."""

import torch

from qwen2vl.model.text import RMSNorm, activation


def test_rmsnorm_casts_before_the_weight_multiply():
    norm = RMSNorm(8, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8).to(torch.bfloat16)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), norm.weight * normed)


def test_activations():
    x = torch.linspace(-3, 3, 13)
    assert torch.allclose(activation("quick_gelu")(x), x * torch.sigmoid(1.702 * x))
    assert torch.allclose(activation("silu")(x), x * torch.sigmoid(x))

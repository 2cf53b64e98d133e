"""model/vision.py: matmul patch embedding = Conv3d, merger grouping, per-image attention isolation."""

import torch
from support.checkpoints import tiny_config

from qwen2vl.model.vision import PatchEmbed, PatchMerger, Qwen2VisionTransformerPretrainedModel


def _vision(seed=0):
    torch.manual_seed(seed)
    model = Qwen2VisionTransformerPretrainedModel(tiny_config().vision_config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_patch_embed_matmul_equals_conv3d():
    cfg = tiny_config().vision_config
    embed = PatchEmbed(cfg)
    torch.nn.init.normal_(embed.proj.weight)
    x = torch.randn(7, cfg.patch_dim)
    conv = torch.nn.functional.conv3d(x.view(7, 3, 2, 14, 14), embed.proj.weight, stride=(2, 14, 14))
    assert embed.proj.weight.shape == (32, 3, 2, 14, 14)
    assert torch.allclose(embed(x), conv.view(7, 32), atol=1e-4)


def test_merger_concatenates_four_consecutive_patches():
    cfg = tiny_config().vision_config
    merger = PatchMerger(cfg)
    x = torch.randn(8, 32)
    out = merger(x)
    expected = merger.mlp(merger.ln_q(x).reshape(2, 4 * 32))
    assert out.shape == (2, 64) and torch.equal(out, expected)
    assert isinstance(merger.mlp[1], torch.nn.GELU) and merger.mlp[1].approximate == "none"


def test_images_do_not_attend_to_each_other():
    model = _vision()
    grids = torch.tensor([[1, 4, 4], [1, 2, 4]])
    pixels = torch.randn(24, 1176)
    with torch.no_grad():
        first = model(pixels, grids).pooler_output
        changed = pixels.clone()
        changed[16:] = torch.randn(8, 1176)
        second = model(changed, grids).pooler_output
    assert first.shape == (6, 64)
    assert torch.equal(first[:4], second[:4]) and not torch.allclose(first[4:], second[4:])


def test_video_frames_are_separate_segments():
    """A 2-temporal-patch video equals its two slices run as separate 1-slice items."""
    model = _vision(1)
    pixels = torch.randn(32, 1176)
    with torch.no_grad():
        video = model(pixels, torch.tensor([[2, 4, 4]])).pooler_output
        frames = model(pixels, torch.tensor([[1, 4, 4], [1, 4, 4]])).pooler_output
    assert torch.allclose(video, frames, atol=1e-6)


def test_eager_and_sdpa_agree():
    model = _vision(2)
    pixels, grids = torch.randn(40, 1176), torch.tensor([[1, 4, 6], [1, 4, 4]])
    with torch.no_grad():
        sdpa = model(pixels, grids).pooler_output
        model.attn_implementation = "eager"
        eager = model(pixels, grids).pooler_output
    assert torch.allclose(sdpa, eager, atol=1e-5)


def test_patch_embed_equals_conv3d_bit_for_bit_in_bf16():
    """The reference embeds patches with nn.Conv3d; a plain matmul rounds differently in bf16 (at the
    real 1176-wide rows), which flipped greedy tokens of a 2B-shape model after ~20 steps."""
    from qwen2vl.config import Qwen2VLVisionConfig

    config = Qwen2VLVisionConfig(embed_dim=128, num_heads=4, depth=1, hidden_size=64)
    embed = PatchEmbed(config).to(torch.bfloat16)
    torch.manual_seed(0)
    torch.nn.init.normal_(embed.proj.weight, std=0.02)
    conv = torch.nn.Conv3d(3, 128, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False).to(torch.bfloat16)
    conv.weight.data.copy_(embed.proj.weight.data)
    pixels = torch.randn(300, 1176)
    expected = conv(pixels.to(torch.bfloat16).view(-1, 3, 2, 14, 14)).view(-1, 128)
    assert torch.equal(embed(pixels), expected)

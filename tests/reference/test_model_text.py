"""Sliding-window decoder layers (layer_types) vs transformers' eager text model."""

import torch
from support.checkpoints import rel_diff, tiny_config

from qwen2vl.model.text import Qwen2VLTextModel


def test_sliding_window_layers_match_transformers():
    from transformers import Qwen2VLTextConfig as HFText
    from transformers import Qwen2VLTextModel as HFModel

    overrides = dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)
    ours_cfg = tiny_config(**overrides).text_config
    assert ours_cfg.layer_types == ["full_attention", "sliding_attention"]
    hf_cfg = HFText(**{k: v for k, v in ours_cfg.to_dict().items() if k not in ("model_type",)})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = HFModel(hf_cfg).eval()
    ours = Qwen2VLTextModel(ours_cfg).eval()
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = hf(input_ids=ids).last_hidden_state
        got = ours(input_ids=ids).last_hidden_state
        full = Qwen2VLTextModel(tiny_config().text_config).eval()
        full.load_state_dict(hf.state_dict())
        no_window = full(input_ids=ids).last_hidden_state
    assert rel_diff(got, expected) < 1e-5
    assert rel_diff(no_window, expected) > 1e-3  # the window really restricts layer 1

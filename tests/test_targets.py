"""The target-layer description of the released SDXL layout."""

import pytest

from hyperlora_core.targets import TargetLinear, sdxl_target_layers
from hyperlora_core.topology import SDXL


def test_sdxl_has_560_linears_in_token_order():
    layers = sdxl_target_layers(SDXL)
    assert len(layers.modules) == 140
    assert len(layers.linears) == 560
    assert layers.token_count == 1120
    first = layers.linears[0]
    assert first.key == "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert (first.in_features, first.out_features) == (640, 640)
    # attn2's to_k reads the 2048-wide text context
    k2 = layers.modules[1].linears[1]
    assert k2.key.endswith("attn2.to_k") and (k2.in_features, k2.out_features) == (2048, 640)
    assert sum(1 for lin in layers.linears if lin.in_features == 2048) == 140


def test_bad_linear_is_refused():
    with pytest.raises(ValueError, match="without '.weight'"):
        TargetLinear("diffusion_model.x.weight", 4, 4)
    with pytest.raises(ValueError, match="positive"):
        TargetLinear("diffusion_model.x", 0, 4)

"""Switching off a sublayer equals zeroing its output projection's weights and bias, leaves
the model untouched afterwards, and names what it cannot find."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from curvedit.diagnostics.ablate import AblationError, ablated, sublayer_outputs


def _vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=3,
                                               num_attention_heads=2, intermediate_size=32, num_labels=5)).eval()


def _zeroed(model, name_suffix):
    reference = copy.deepcopy(model)
    module = dict(reference.named_modules())[name_suffix]
    with torch.no_grad():
        module.weight.zero_()
        module.bias.zero_()
    return reference


@pytest.mark.parametrize("kind, block", [("attention", 0), ("mlp", 1), ("mlp", 2)])
def test_ablating_a_vit_sublayer_equals_zeroing_its_output_projection(kind, block):
    model = _vit()
    pixels = torch.randn(4, 3, 8, 8)
    before = model(pixel_values=pixels).logits
    with ablated(model, kind, block) as module:
        names = {m: n for n, m in model.named_modules()}
        ablated_logits = model(pixel_values=pixels).logits
    reference = _zeroed(model, names[module])
    assert torch.allclose(ablated_logits, reference(pixel_values=pixels).logits, atol=1e-6)
    assert not torch.allclose(ablated_logits, before)
    assert torch.equal(model(pixel_values=pixels).logits, before)  # the hook is gone


def test_every_block_of_vit_and_gpt2_has_both_sublayers():
    assert set(sublayer_outputs(_vit())) == {(k, b) for k in ("attention", "mlp") for b in range(3)}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8))
    outputs = sublayer_outputs(gpt2)
    assert set(outputs) == {(k, b) for k in ("attention", "mlp") for b in range(2)}
    assert outputs[("mlp", 1)] is gpt2.transformer.h[1].mlp.c_proj


def test_ablation_names_an_unknown_kind_or_a_missing_block():
    model = _vit()
    with pytest.raises(AblationError, match="unknown sublayer 'norm'"):
        with ablated(model, "norm", 0):
            pass
    with pytest.raises(AblationError, match=r"no mlp in block 7 \(blocks with one: \[0, 1, 2\]\)"):
        with ablated(model, "mlp", 7):
            pass

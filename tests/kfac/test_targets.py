"""Target selection: presets per family, patterns, layer ranges, the (d_out, d_in) view."""

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from curvedit.kfac.targets import TargetError, TargetSpec, layer_index, parse_layers, select_targets
from tests.tiny_models import tiny_gpt2, tiny_olmo2, tiny_vit


def names(model, **spec):
    return [t.name for t in select_targets(model, TargetSpec(**spec))]


def test_mlp_preset_on_gpt2_selects_c_fc_and_mlp_c_proj_but_not_attention():
    assert names(tiny_gpt2(), preset="mlp") == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


def test_mlp_presets_on_olmo2():
    model = tiny_olmo2()
    assert names(model, preset="mlp-in", layers="1") == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert names(model, preset="mlp-out") == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_mlp_preset_on_vit_selects_both_mlp_matrices_and_no_attention_output():
    model = tiny_vit()
    chosen = names(model, preset="mlp", layers="0")
    mlp_pairs = (["vit.layers.0.mlp.fc1", "vit.layers.0.mlp.fc2"],  # transformers >= 5
                 ["vit.encoder.layer.0.intermediate.dense", "vit.encoder.layer.0.output.dense"])  # transformers 4
    assert chosen in mlp_pairs
    assert all(any(n == c for n, _ in model.named_modules()) for c in chosen)


def test_mlp_preset_on_llama_and_neox():
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2))
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2))
    assert names(llama, preset="mlp") == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert names(neox, preset="mlp") == ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"]


def test_glob_and_regex_patterns_and_union_with_preset():
    model = tiny_gpt2()
    assert names(model, patterns=("*.attn.c_attn",)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert names(model, patterns=(r"re:h\.1\.mlp\.c_fc$",)) == ["transformer.h.1.mlp.c_fc"]
    assert len(names(model, patterns=("*.attn.c_attn",), preset="mlp", layers="0")) == 3


def test_layer_ranges():
    assert parse_layers("23-25") == {23, 24, 25}
    assert parse_layers("0,3,5-7") == {0, 3, 5, 6, 7}
    assert layer_index("model.layers.23.mlp.up_proj") == 23
    assert layer_index("lm_head") is None
    with pytest.raises(TargetError, match="bad layer range"):
        parse_layers("3-1")


def test_pattern_matching_nothing_lists_existing_modules():
    with pytest.raises(TargetError, match=r"modules that exist: transformer\.h\.0\.attn\.c_attn"):
        select_targets(tiny_gpt2(), TargetSpec(patterns=("*.q_proj",)))
    with pytest.raises(TargetError, match="unknown preset"):
        select_targets(tiny_gpt2(), TargetSpec(preset="attention"))


def test_conv1d_is_seen_as_d_out_by_d_in_and_matches_the_forward():
    model = tiny_gpt2()
    target = select_targets(model, TargetSpec(patterns=("transformer.h.0.mlp.c_fc",)))[0]
    assert isinstance(target.module, Conv1D) and target.transposed
    assert target.shape_oi == (64, 16)
    x = torch.randn(3, 16, dtype=torch.float64)
    expected = x @ target.weight_oi().T + target.module.bias
    torch.testing.assert_close(target.module(x), expected)
    new = torch.randn(64, 16, dtype=torch.float64)
    target.set_weight_oi(new)
    torch.testing.assert_close(target.module(x), x @ new.T + target.module.bias)
    with pytest.raises(TargetError, match="expected"):
        target.set_weight_oi(new.T)

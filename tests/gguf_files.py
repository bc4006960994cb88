"""Write a tiny Llama model as a GGUF file, the way llama.cpp's converter lays it out."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import transformers

from tests.tiny_models import MERGES, gpt2_vocabulary

LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def permute_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q or k projection's rows from HF's rotary layout to llama.cpp's (interleaved pairs).

    Args:
        weight: the `(heads * head_dim, hidden)` projection weight.
        heads: its number of heads (the key/value heads for k).

    Returns:
        The permuted weight, which transformers' GGUF loader permutes back.
    """
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(model: transformers.LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under their GGUF names, q and k permuted as llama.cpp stores them."""
    config = model.config
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            tensors[f"blk.{layer}.{gguf_name}.weight"] = state[f"model.layers.{layer}.{hf_name}.weight"]
        q, k = f"blk.{layer}.attn_q.weight", f"blk.{layer}.attn_k.weight"
        tensors[q] = permute_for_llama_cpp(tensors[q], config.num_attention_heads)
        tensors[k] = permute_for_llama_cpp(tensors[k], config.num_key_value_heads)
    return tensors


def add_tensor(writer: gguf.GGUFWriter, name: str, weight: np.ndarray, quantization: str) -> None:
    """Add one tensor: matrices in `quantization` ("F32" or "Q8_0"), vectors (norms) always F32."""
    if quantization == "F32" or weight.ndim == 1:
        writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float32))
        return
    qtype = gguf.GGMLQuantizationType[quantization]
    writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(weight, dtype=np.float32), qtype),
                      raw_dtype=qtype)


def write_tiny_llama_gguf(model: transformers.LlamaForCausalLM, path: Path, quantization: str = "F32",
                          record_file_type: bool = True) -> Path:
    """Write `model` (from `tiny_llama`) and a byte-level BPE tokenizer as a llama GGUF file.

    Args:
        model: the Llama to store.
        path: the `.gguf` file to write.
        quantization: "F32" or "Q8_0", for the matrices.
        record_file_type: write `general.file_type` (llama.cpp always does).

    Returns:
        `path`.
    """
    config = model.config
    vocabulary = gpt2_vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if record_file_type:
        writer.add_file_type(FILE_TYPES[quantization])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocabulary)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(vocabulary) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(vocabulary) - 1)
    writer.add_eos_token_id(len(vocabulary) - 1)
    for name, weight in gguf_tensors(model).items():
        add_tensor(writer, name, weight, quantization)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

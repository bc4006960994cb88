"""GGUF files (llama.cpp, Ollama) as `--model`: loading, quantization reporting, editing to an HF folder."""

import copy
import json
import shutil
import sys

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from curvedit.cli import app  # noqa: E402
from curvedit.io import file_sha256  # noqa: E402
from curvedit.models import ModelLoadError, find_gguf, gguf_quantization, load_model  # noqa: E402
from tests.gguf_files import write_tiny_llama_gguf  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

IDS = torch.tensor([[3, 50, 100, 200, 262, 7, 259]])


@pytest.fixture(scope="module")
def llama():
    """The HF model every GGUF file here is written from."""
    return tiny_llama()


@pytest.fixture(scope="module")
def f32_gguf(llama, tmp_path_factory):
    """`llama` as an F32 GGUF file, alone in its directory."""
    return write_tiny_llama_gguf(llama, tmp_path_factory.mktemp("f32") / "tiny-f32.gguf")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def q8_0_round_trip(model):
    """A copy of `model` whose matrices went through Q8_0 and back, as a Q8_0 GGUF stores them."""
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2:
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), q8_0), q8_0)))
    return rounded


def test_a_gguf_file_loads_with_the_logits_and_tokenizer_it_was_written_from(llama, f32_gguf):
    loaded = load_model(f32_gguf)
    assert loaded.kind == "causal-lm" and loaded.name == str(f32_gguf)
    assert next(loaded.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(logits(loaded.model), logits(llama), atol=1e-6, rtol=0)
    ids = loaded.preprocessor("hello world")["input_ids"]
    assert len(ids) == 2 and loaded.preprocessor.decode(ids) == "hello world"
    assert loaded.source == {"format": "gguf", "file": str(f32_gguf), "quantization": "F32",
                             "sha256": file_sha256(f32_gguf)}


def test_a_folder_with_one_gguf_loads_it_and_one_with_two_is_refused(llama, f32_gguf, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    q8_0 = write_tiny_llama_gguf(llama, single / "tiny-q8_0.gguf", "Q8_0")
    loaded = load_model(single)
    assert loaded.source["quantization"] == "Q8_0" and loaded.source["file"] == str(q8_0)
    torch.testing.assert_close(logits(loaded.model), logits(q8_0_round_trip(llama)), atol=1e-5, rtol=0)
    assert loaded.preprocessor("hello world")["input_ids"] == [259, 264]

    shutil.copy(f32_gguf, single / f32_gguf.name)
    with pytest.raises(ModelLoadError, match="holds 2 GGUF files.*tiny-f32.gguf, tiny-q8_0.gguf"):
        load_model(single)
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_model(tmp_path / "missing.gguf")


def test_the_quantization_comes_from_the_tensors_without_a_file_type_and_hf_folders_are_not_gguf(llama, tmp_path):
    unlabelled = write_tiny_llama_gguf(llama, tmp_path / "unlabelled.gguf", "Q8_0", record_file_type=False)
    assert gguf_quantization(unlabelled) == "Q8_0"
    llama.save_pretrained(tmp_path / "hf")
    shutil.copy(unlabelled, tmp_path / "hf")
    assert find_gguf(tmp_path / "hf") is None and find_gguf("org/model") is None


def test_cli_edit_of_a_gguf_writes_an_hf_folder_recording_the_gguf_source(llama, f32_gguf, tmp_path):
    out = tmp_path / "edited"
    result = CliRunner().invoke(app, ["edit", "--model", str(f32_gguf), "--method", "svd", "--keep-fraction", "0.5",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    edited = AutoModelForCausalLM.from_pretrained(out)
    before, after = llama.state_dict(), edited.state_dict()
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]) != (".mlp." in name), name
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [259, 264]
    manifest = json.loads((out / "curvedit-edit.json").read_text())
    assert manifest["model"] == str(f32_gguf)
    assert manifest["model_source"] == {"format": "gguf", "file": str(f32_gguf), "quantization": "F32",
                                        "sha256": file_sha256(f32_gguf)}


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_a_missing_gguf_package_names_the_extra_to_install(f32_gguf, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ModelLoadError, match=rf"{package} is missing.*pip install 'curvedit\[gguf\]'"):
        load_model(f32_gguf)

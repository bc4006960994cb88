"""BalancedSubnet: the mask, the straight-through scores, baking, and forgetting."""

import json

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.editing.balanced_subnet import (
    BSNError,
    BSNOptions,
    SubnetMasks,
    balanced_subnet,
    masked_count,
    train_subnet,
)
from curvedit.evaluate.generation import greedy_generate
from curvedit.kfac.targets import Target, TargetSpec, select_targets
from tests.tiny_models import tiny_gpt2, tiny_olmo2


def mlp_targets(model):
    return select_targets(model, TargetSpec(preset="mlp"))


def test_masked_count_is_the_nearest_integer_with_halves_rounded_up():
    assert masked_count(1024, 0.0015) == 2  # 1.536
    assert masked_count(1000, 0.0015) == 2  # 1.5: half rounds up
    assert masked_count(1000, 0.0014) == 1  # 1.4
    assert masked_count(100, 0.004) == 0  # 0.4
    assert masked_count(10, 0.99) == 10


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_olmo2], ids=["conv1d", "linear"])
def test_the_mask_zeroes_exactly_the_lowest_scored_ratio_of_each_matrix(make):
    model = make()
    targets = mlp_targets(model)
    masks = SubnetMasks(targets, ratio=0.05, seed=0)
    with torch.no_grad():
        masks.scores[targets[0].name].fill_(0.5)  # all tied: still exactly k weights go
        masks.scores[targets[1].name][0, :3] = 1e-6  # the three lowest |scores| of this matrix
    keep = masks.keep_masks()
    for target in targets:
        d_out, d_in = target.shape_oi
        k = masked_count(d_out * d_in, 0.05)
        assert int((~keep[target.name]).sum()) == k
        effective_oi = target.weight_oi()  # the weight the forward uses, seen as (d_out, d_in)
        original_oi = target.module.parametrizations.weight.original
        original_oi = original_oi.T if target.transposed else original_oi
        torch.testing.assert_close(effective_oi, original_oi * keep[target.name], rtol=0, atol=0)
    assert not keep[targets[1].name][0, :3].any()
    masks.remove()


def test_scores_get_the_straight_through_gradient():
    """dL/ds = sign(s) * W * dL/dW_eff: the mask acts as the identity in |s| on the way back."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False).double()
    masks = SubnetMasks([Target("layer", layer, None)], ratio=0.25, seed=1)
    x = torch.randn(5, 6, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    scores = masks.scores["layer"]
    w = layer.parametrizations.weight.original.detach()
    w_eff = w * masks.keep_masks()["layer"]
    grad_w_eff = 2 * (x @ w_eff.T).T @ x  # d/dW of sum((x W^T)^2)
    torch.testing.assert_close(scores.grad, torch.sign(scores.detach()) * w * grad_w_eff)


def test_only_the_scores_change_during_training():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = SubnetMasks(mlp_targets(model), ratio=0.05, seed=0)
    initial_scores = {k: v.detach().clone() for k, v in masks.scores.items()}
    train_subnet(model, masks, [[1, 2, 3, 4, 5, 6]], [[6, 5, 4, 3], [2, 2, 3]],
                 BSNOptions(ratio=0.05, epochs=3, batch_size=2, progress=False))
    assert all(not torch.equal(initial_scores[k], v) for k, v in masks.scores.items())
    masks.remove()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_olmo2], ids=["conv1d", "linear"])
def test_baking_reproduces_the_masked_forward_exactly(make):
    model = make()
    targets = mlp_targets(model)
    originals = {t.name: t.weight_oi().detach().clone() for t in targets}
    masks = SubnetMasks(targets, ratio=0.1, seed=3)
    ids = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked_logits = model(input_ids=ids).logits
    keep = masks.keep_masks()
    stats = masks.bake()
    with torch.no_grad():
        baked_logits = model(input_ids=ids).logits
    assert torch.equal(baked_logits, masked_logits)
    assert not any(hasattr(t.module, "parametrizations") for t in targets)
    for target, stat in zip(targets, stats):
        assert torch.equal(target.weight_oi(), originals[target.name] * keep[target.name])
        assert stat.masked == int((~keep[target.name]).sum()) and stat.total == keep[target.name].numel()


def test_empty_sets_and_a_ratio_that_masks_nothing_are_refused():
    model = tiny_gpt2()
    targets = mlp_targets(model)
    with pytest.raises(BSNError, match="forget set is empty"):
        balanced_subnet(model, targets, [], [[1, 2, 3]], BSNOptions(progress=False))
    with pytest.raises(BSNError, match="retain set is empty"):
        balanced_subnet(model, targets, [[1, 2, 3]], [], BSNOptions(progress=False))
    with pytest.raises(BSNError, match="shorter than 2 tokens"):
        balanced_subnet(model, targets, [[1]], [[1, 2]], BSNOptions(progress=False))
    with pytest.raises(BSNError, match="zeroes no weight"):
        balanced_subnet(model, targets, [[1, 2]], [[1, 2]], BSNOptions(ratio=1e-5, progress=False))
    assert not any(hasattr(t.module, "parametrizations") for t in targets)


PREFIX = 3


def memorizing_gpt2():
    """A 2-layer GPT-2 trained (well under a second) to recite six 10-token id sequences."""
    torch.manual_seed(0)
    seqs = torch.randint(3, 32, (6, 10), generator=torch.Generator().manual_seed(0))
    seqs[:, 0] = torch.arange(3, 9)  # distinct first tokens: every sequence is recitable
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(300):
        loss = model(input_ids=seqs, labels=seqs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            with torch.no_grad():
                if bool((model(input_ids=seqs).logits[:, :-1].argmax(-1) == seqs[:, 1:]).all()):
                    break
    return model.eval(), seqs.tolist()


def recalled(model, seqs):
    """How many sequences the model continues exactly (greedy) from their first tokens."""
    out = greedy_generate(model, [s[:PREFIX] for s in seqs], len(seqs[0]) - PREFIX)
    return sum(o == s[PREFIX:] for o, s in zip(out, seqs))


def test_balanced_subnet_makes_the_model_forget_the_forget_set_and_keep_the_retain_set():
    model, seqs = memorizing_gpt2()
    forget, retain = seqs[:4], seqs[4:]
    assert recalled(model, forget) == 4 and recalled(model, retain) == 2
    result = balanced_subnet(model, mlp_targets(model), forget, retain,
                             BSNOptions(ratio=0.2, epochs=50, batch_size=4, progress=False))
    assert recalled(model, forget) == 0
    assert recalled(model, retain) == 2
    assert result.history[-1].forget_ce > 5 * result.history[0].forget_ce
    assert result.history[-1].retain_ce < result.history[-1].forget_ce / 5


def test_cli_writes_a_loadable_masked_model_and_its_manifest(tmp_path, lm_dir, text_jsonl):
    windows = tmp_path / "tune.jsonl"
    windows.write_text(json.dumps({"prefix": "the quick ", "suffix": "brown fox", "memorized": True}) + "\n"
                       + json.dumps({"prefix": "hello ", "suffix": "world", "memorized": False}) + "\n")
    out = tmp_path / "bsn"
    result = CliRunner().invoke(app, ["baseline", "bsn", "--model", str(lm_dir), "--forget", str(windows),
                                      "--retain", str(text_jsonl), "--out", str(out), "--ratio", "0.01",
                                      "--epochs", "2", "--batch-size", "2", "--seq-len", "16", "--no-progress"])
    assert result.exit_code == 0, result.output
    before = AutoModelForCausalLM.from_pretrained(lm_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        is_mlp = ".mlp.c_fc.weight" in name or ".mlp.c_proj.weight" in name
        zeroed = int(((tensor == 0) & (before[name] != 0)).sum())
        assert zeroed == (masked_count(tensor.numel(), 0.01) if is_mlp else 0), name
    manifest = json.loads((out / "curvedit-edit.json").read_text())
    assert manifest["plan"]["method"] == "balanced-subnet" and manifest["plan"]["ratio"] == 0.01
    assert manifest["data"]["forget_sequences"] == 1  # the non-memorized row is skipped
    assert len(manifest["history"]) == 2
    assert manifest["targets"]["transformer.h.0.mlp.c_fc"]["masked"] == masked_count(64 * 16, 0.01)
    assert (out / "tokenizer.json").is_file()


def test_cli_refuses_an_empty_forget_file(tmp_path, lm_dir, text_jsonl):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = CliRunner().invoke(app, ["baseline", "bsn", "--model", str(lm_dir), "--forget", str(empty),
                                      "--retain", str(text_jsonl), "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 2 and "forget set is empty" in result.output

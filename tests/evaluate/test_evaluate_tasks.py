"""Task probes: the JSONL format, its errors, scoring, and the lm-evaluation-harness bridge."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from curvedit.evaluate.tasks import (
    ChoiceItem,
    GenerateItem,
    Task,
    TaskFormatError,
    TaskOptions,
    choice_scores,
    load_tasks,
    parse_task_file,
    run_lm_eval,
    run_tasks,
)
from tests.reciter import HELDOUT, MEMORIZED, PREFIX, trained_reciter


def write_lines(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def local_choice_task(tmp_path, task, data, text_field):
    """An lm-eval multiple-choice task over a local JSONL (`text_field`, `choices`, `label`) in `tmp_path/yaml`."""
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\n"
        f"dataset_kwargs:\n  cache_dir: {tmp_path / 'hf-cache'}\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ntarget_delimiter: ''\n"
        f'doc_to_text: "{{{{{text_field}}}}}"\ndoc_to_choice: "{{{{choices}}}}"\ndoc_to_target: "{{{{label}}}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture(scope="module")
def reciter():
    return trained_reciter()


def test_header_gives_defaults_and_items_override_them(tmp_path):
    path = write_lines(tmp_path / "recall.jsonl",
                       {"type": "header", "fewshot": "Q: ", "max_new_tokens": 5, "normalize": True},
                       {"type": "generate", "prompt": "a", "answer": ["x", "y"]},
                       "",
                       {"type": "choice", "prompt": "b", "choices": ["c", "d"], "answer": 1, "fewshot": ""})
    task = parse_task_file(path)
    assert task.name == "recall"
    assert task.items == (GenerateItem("a", ("x", "y"), "Q: ", 5, 2), ChoiceItem("b", ("c", "d"), 1, "", True, 4))


@pytest.mark.parametrize("line, message", [
    ('{"type": "generate", "prompt": "a"', "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"type": "qa", "prompt": "a"}', "'type' must be 'generate' or 'choice'"),
    ('{"type": "generate", "prompt": "a", "answer": 3}', "'answer' must be a string"),
    ('{"type": "generate", "prompt": "a", "answr": "b"}', r"unknown field\(s\) \['answr'\]"),
    ('{"type": "generate", "prompt": "a", "answer": "b\\nc"}', "must be one line"),
    ('{"type": "choice", "prompt": "a", "choices": ["b"], "answer": 0}', "at least 2"),
    ('{"type": "choice", "prompt": "a", "choices": ["b", "c"], "answer": 2}', r"index of the right choice \(0..1\)"),
    ('{"type": "header", "fewshot": "x"}', "header must be the first line"),
])
def test_a_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", {"type": "generate", "prompt": "ok", "answer": "ok"}, "", line)
    with pytest.raises(TaskFormatError, match=rf"bad.jsonl:3: .*{message}"):
        parse_task_file(path)


def test_a_tasks_directory_has_one_task_per_file(tmp_path):
    write_lines(tmp_path / "b.jsonl", {"type": "generate", "prompt": "a", "answer": "b"})
    write_lines(tmp_path / "a.jsonl", {"type": "generate", "prompt": "a", "answer": "b"})
    (tmp_path / "notes.txt").write_text("ignored")
    assert [t.name for t in load_tasks(tmp_path)] == ["a", "b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TaskFormatError, match="no .jsonl task file"):
        load_tasks(empty)


def test_recitation_probes_score_the_trained_model(reciter, tmp_path):
    generate = [{"type": "generate", "prompt": t[:PREFIX], "answer": t[PREFIX:], "max_new_tokens": 12}
                for t in MEMORIZED]
    wrong = {"type": "generate", "prompt": MEMORIZED[0][:PREFIX], "answer": "nope", "max_new_tokens": 12}
    choice = [{"type": "choice", "prompt": t[:PREFIX], "choices": [h[PREFIX:], t[PREFIX:]], "answer": 1}
              for t, h in zip(MEMORIZED, HELDOUT)]
    write_lines(tmp_path / "gen.jsonl", *generate, wrong)
    write_lines(tmp_path / "mc.jsonl", {"type": "header", "normalize": True}, *choice)
    results = {r.name: r for r in run_tasks(reciter.model, reciter.tokenizer, load_tasks(tmp_path))}
    assert (results["gen"].n, results["gen"].accuracy) == (5, 0.8)
    assert results["gen"].details[0]["output"] == MEMORIZED[0][PREFIX:]
    assert (results["mc"].n, results["mc"].accuracy) == (4, 1.0)
    limited = run_tasks(reciter.model, reciter.tokenizer, load_tasks(tmp_path / "gen.jsonl"), TaskOptions(limit=2))
    assert limited[0].n == 2


def test_choice_scores_sum_continuation_log_likelihoods(reciter):
    import torch

    ids = reciter.tokenizer(MEMORIZED[0], add_special_tokens=False)["input_ids"]
    (total, count), = choice_scores(reciter.model, [(ids[:5], ids[5:8])])
    with torch.no_grad():
        logp = reciter.model(input_ids=torch.tensor([ids[:8]])).logits[0].log_softmax(-1)
    assert count == 3
    assert total == pytest.approx(sum(float(logp[t - 1, ids[t]]) for t in range(5, 8)), abs=1e-5)


def test_probes_need_a_tokenizer(reciter, tmp_path):
    write_lines(tmp_path / "t.jsonl", {"type": "generate", "prompt": "a", "answer": "b"})
    with pytest.raises(ValueError, match="needs a tokenizer"):
        run_tasks(reciter.model, None, load_tasks(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_bridge_explains_a_missing_install(reciter):
    with pytest.raises(ImportError, match="pip install 'lm-eval\\[hf\\]'"):
        run_lm_eval(reciter.model, reciter.tokenizer, ["boolq"])


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("accelerate") is None,
                    reason="lm-eval[hf] is not installed")
def test_lm_eval_bridge_runs_a_local_task_on_the_in_memory_model(reciter, tmp_path):
    data = write_lines(tmp_path / "recite.jsonl",
                       *({"question": t[:PREFIX], "choices": [h[PREFIX:], t[PREFIX:]], "label": 1}
                         for t, h in zip(MEMORIZED, HELDOUT)))
    local_choice_task(tmp_path, "curvedit_recite", data, "question")
    results = run_lm_eval(reciter.model, reciter.tokenizer, ["curvedit_recite"], batch_size=4,
                          include_path=tmp_path / "yaml", include_defaults=False)
    assert results == {"curvedit_recite": {"acc,none": 1.0}}
    with pytest.raises(ValueError, match="does not know the task"):
        run_lm_eval(reciter.model, reciter.tokenizer, ["no_such_task"], include_path=tmp_path / "yaml",
                    include_defaults=False)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("accelerate") is None,
                    reason="lm-eval[hf] is not installed")
def test_lm_eval_scores_capability_items_from_a_local_yaml_as_curvedit_does(tmp_path):
    import string

    from curvedit.chartok import build_char_tokenizer
    from curvedit.evaluate.capabilities import capability_tasks
    from tests.tiny_models import tiny_gpt2

    tokenizer = build_char_tokenizer(string.ascii_letters + string.digits + " .,:?'+-=()\n")
    model = tiny_gpt2(seed=3, vocab=len(tokenizer), n_layer=2).float()
    model.config.n_positions = 512
    model.transformer.wpe = torch.nn.Embedding(512, 16)
    model.config.pad_token_id = 0
    tasks = capability_tasks(["add_1d", "boolean", "cloze"], n=12, seed=0, fmt="choice")
    items = [item for task in tasks for item in task.items]
    data = write_lines(tmp_path / "suite.jsonl", *({"context": i.fewshot + i.prompt, "choices": list(i.choices),
                                                      "label": i.answer} for i in items))
    local_choice_task(tmp_path, "curvedit_suite", data, "context")
    ours = run_tasks(model, tokenizer, [Task("suite", tmp_path, tuple(items))], TaskOptions(batch_size=8))[0]
    theirs = run_lm_eval(model, tokenizer, ["curvedit_suite"], batch_size=8, include_path=tmp_path / "yaml",
                         include_defaults=False)
    assert theirs["curvedit_suite"]["acc,none"] == pytest.approx(ours.accuracy)
    assert 0 < ours.accuracy < 1  # a random model: neither all right nor all wrong, so the match says something

"""The capability suite: seeded families in the paper's bands, both formats, usability by chance."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.errors import EvaluateError
from curvedit.evaluate.capabilities import BANDS, FAMILIES, capability_tasks, chance, score_families, write_tasks
from curvedit.evaluate.tasks import ChoiceItem, GenerateItem, TaskResult, load_tasks


def test_every_family_has_distinct_items_up_to_100_or_its_whole_space():
    for task in capability_tasks(n=100, seed=0):
        prompts = [item.prompt for item in task.items]
        assert len(set(prompts)) == len(prompts)
        family = FAMILIES[task.name]
        assert len(prompts) == (min(100, family.limit) if family.limit else len(prompts))
        assert len(prompts) >= 20, task.name
        assert sum(len(t.items) >= 100 for t in capability_tasks(n=100, seed=0)) >= 9


def test_the_suite_covers_the_paper_s_bands():
    assert {"logic", "open-book QA", "closed-book common", "closed-book rare", "arithmetic", "copying/pattern",
            "cloze"} == set(BANDS)


def test_the_same_seed_gives_the_same_items_in_both_formats_and_another_seed_others():
    generate, choice = capability_tasks(n=30, seed=4), capability_tasks(n=30, seed=4, fmt="choice")
    assert generate == capability_tasks(n=30, seed=4)
    for g, c in zip(generate, choice):
        assert [(i.prompt, i.fewshot) for i in g.items] == [(i.prompt, i.fewshot) for i in c.items]
        for gi, ci in zip(g.items, c.items):  # the choice format's right option is the generate answer
            assert ci.choices[ci.answer].strip() == gi.answers[0] and len(set(ci.choices)) == len(ci.choices)
    assert capability_tasks(["add_2d"], n=30, seed=5) != capability_tasks(["add_2d"], n=30, seed=4)


def test_few_shot_examples_are_solved_items_of_the_family_never_the_item_itself():
    for task in capability_tasks(n=40, seed=1):
        for item in task.items:
            shots = item.fewshot.splitlines()
            assert 1 <= len(shots) <= 3
            assert all(not shot.startswith(item.prompt + " ") for shot in shots)


def _arithmetic_answer(prompt: str) -> str:
    a, op, b = re.fullmatch(r"(\d+) ([+-]) (\d+) =", prompt).groups()
    return str(int(a) + int(b) if op == "+" else int(a) - int(b))


def test_generated_answers_are_right_by_an_independent_computation():
    tasks = {t.name: t for t in capability_tasks(n=100, seed=2)}
    for name in ("add_1d", "add_2d", "sub_1d", "sub_2d"):
        for item in tasks[name].items:
            assert item.answers[0] == _arithmetic_answer(item.prompt) and int(item.answers[0]) >= 0
            low, high = (1, 9) if name.endswith("1d") else (10, 99)
            assert all(low <= int(x) <= high for x in re.findall(r"\d+", item.prompt))
    for item in tasks["boolean"].items:
        assert item.answers[0] == str(eval(item.prompt.removesuffix(" is")))  # noqa: S307 - our own expressions
    for item in tasks["counting"].items:
        terms = [int(x) for x in item.prompt.rstrip(",").split(", ")]
        assert int(item.answers[0]) == 2 * terms[-1] - terms[-2]
    for item in tasks["ordering"].items:  # the chain's first name is the most, its last the least
        facts = re.findall(r"(\w+) is \w+er than (\w+)\.", item.prompt)
        order = {a: b for a, b in facts}
        top = next(a for a in order if a not in order.values())
        bottom = next(b for b in order.values() if b not in order)
        asks_most = re.search(r"Who is the (oldest|tallest|fastest)\?", item.prompt) is not None
        assert item.answers[0] == (top if asks_most else bottom)
    for item in tasks["open_book"].items + tasks["cloze"].items:
        assert item.answers[0] in item.prompt  # the answer stands in the context


def test_fact_families_hold_their_tables_with_accepted_spellings():
    facts = {t.name: t for t in capability_tasks(["facts_common", "facts_rare"], n=1000, seed=0)}
    common = {i.prompt: i.answers for i in facts["facts_common"].items}
    assert common["The capital of France is"][0] == "Paris"
    assert "Kiev" in common["The capital of Ukraine is"]
    rare = {i.prompt: i.answers[0] for i in facts["facts_rare"].items}
    assert rare["The capital of Bhutan is"] == "Thimphu" and rare["The currency of Poland is the"] == "zloty"
    assert FAMILIES["facts_common"].band == "closed-book common" and FAMILIES["facts_rare"].band == "closed-book rare"


def test_chance_is_one_over_choices_or_the_closed_answer_space():
    def scored(name, types_choices):
        return TaskResult(name, len(types_choices), 0.0, [
            {"type": kind, "correct": False, **({"scores": [0.0] * k} if kind == "choice" else {})}
            for kind, k in types_choices])

    assert chance(scored("boolean", [("choice", 2)] * 3)) == pytest.approx(0.5)
    assert chance(scored("facts_rare", [("choice", 4), ("choice", 2)])) == pytest.approx(0.375)
    assert chance(scored("boolean", [("generate", 0)])) == 0.5
    assert chance(scored("ordering", [("generate", 0)])) == pytest.approx(1 / 3)
    assert chance(scored("add_2d", [("generate", 0)])) == 0.0 and chance(scored("mine", [("generate", 0)])) == 0.0


def _result(name: str, correct: int, n: int) -> TaskResult:
    return TaskResult(name, n, correct / n, [{"type": "generate", "correct": i < correct} for i in range(n)])


def test_a_family_is_usable_only_when_its_interval_clears_chance_by_the_margin():
    got = score_families([_result("boolean", 60, 100), _result("boolean", 75, 100), _result("add_2d", 20, 100),
                          _result("add_2d", 8, 100), _result("my_task", 30, 100)])
    assert [s.usable for s in got] == [False, True, True, False, True]
    assert got[4].band == "custom" and got[4].chance == 0.0
    assert got[1].to_dict()["ci"][0] > 0.6 and got[1].accuracy == 0.75


def test_tasks_written_as_files_read_back_as_the_same_items(tmp_path):
    for fmt in ("generate", "choice"):
        tasks = capability_tasks(["cloze", "add_1d"], n=10, seed=0, fmt=fmt)
        write_tasks(tasks, tmp_path / fmt)
        back = load_tasks(tmp_path / fmt)
        kind = GenerateItem if fmt == "generate" else ChoiceItem
        for original, read in zip(sorted(tasks, key=lambda t: t.name), back):
            assert original.name == read.name and all(isinstance(i, kind) for i in read.items)
            assert [(i.prompt, i.fewshot) for i in original.items] == [(i.prompt, i.fewshot) for i in read.items]


@pytest.mark.parametrize("call, message", [
    (lambda: capability_tasks(["nope"]), "unknown capability family"),
    (lambda: capability_tasks(fmt="essay"), "unknown task format"),
    (lambda: capability_tasks(n=0), "items per family")])
def test_bad_suite_requests_are_refused_by_name(call, message):
    with pytest.raises(EvaluateError, match=message):
        call()


def test_the_cli_writes_the_suite_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "suite"
    result = CliRunner().invoke(app, ["capabilities", "--out", str(out), "--n", "12", "--format", "choice"])
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in out.glob("*.jsonl")) == sorted(FAMILIES)
    again = CliRunner().invoke(app, ["capabilities", "--out", str(out), "--n", "12"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(app, ["capabilities", "--out", str(tmp_path / "x"), "--families", "add_1d,poetry"])
    assert bad.exit_code == 2 and "poetry" in bad.output

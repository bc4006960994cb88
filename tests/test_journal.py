"""The journal of a long job (`curvedit.io.Journal`): finished items survive a kill, and a
resume never reads another run's items."""

import json

import pytest

from curvedit.io import Journal, JournalError, digest


def test_a_reopened_journal_gives_back_its_items_in_order(tmp_path):
    path = tmp_path / "run" / "job.journal.jsonl"
    journal = Journal(path, digest({"run": 1}), "sweep")
    assert journal.items == [] and not path.exists()  # nothing on disk until an item is done
    journal.append({"point": 0})
    journal.append({"point": 1, "values": [0.5, 1e-17]})
    again = Journal(path, digest({"run": 1}), "sweep")
    assert again.items == [{"point": 0}, {"point": 1, "values": [0.5, 1e-17]}]  # floats come back exactly
    again.remove()
    assert not path.exists()


def test_an_item_cut_off_by_a_kill_is_dropped_and_redone(tmp_path):
    path = tmp_path / "job.jsonl"
    Journal(path, "k", "sweep").append({"point": 0})
    with path.open("a") as handle:
        handle.write('{"point": 1, "val')  # the kill came mid-line
    journal = Journal(path, "k", "sweep")
    assert journal.items == [{"point": 0}]
    journal.append({"point": 1})
    assert [json.loads(line) for line in path.read_text().splitlines()][1:] == [{"point": 0}, {"point": 1}]


@pytest.mark.parametrize("key, what, match", [("other", "sweep", "another sweep's finished items"),
                                              ("k", "layer map", "not a layer map journal")])
def test_another_run_s_journal_is_refused(tmp_path, key, what, match):
    path = tmp_path / "job.jsonl"
    Journal(path, "k", "sweep").append({"point": 0})
    with pytest.raises(JournalError, match=match):
        Journal(path, key, what)
    assert len(path.read_text().splitlines()) == 2  # and left as it was


def test_a_file_that_is_not_a_journal_is_refused(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("my notes\nmore notes\n")
    with pytest.raises(JournalError, match="line 1 is not JSON"):
        Journal(path, "k", "sweep")
    assert path.read_text() == "my notes\nmore notes\n"

"""JSONL export for other RLHF tools, loaded back with `datasets`; the `python -m db` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db import FeedbackStore, Flag, NewGeneration
from db.export import export_jsonl
from store_fixtures import store, store_url  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
EMOJI_PROMPT = "Say hi 👋 <b>politely</b>"


@pytest.fixture
def rated(store: FeedbackStore) -> FeedbackStore:
    """Two prompts; ratings by two raters (one changed) and one explicit preference."""
    hi = store.add_prompt(EMOJI_PROMPT)
    hi_a, hi_b, hi_c = (
        g.id
        for g in store.record_generations(
            hi, 0, [NewGeneration(t) for t in ("Hello! 😊", "'; DROP TABLE x; --", "Hey")]
        )
    )
    bye = store.add_prompt("Say bye")
    bye_a, bye_b = (
        g.id for g in store.record_generations(bye, 0, [NewGeneration("Bye"), NewGeneration("Ciao")])
    )
    store.rate(hi_a, "alice", 1)
    store.rate(hi_a, "alice", 5, "lovely")  # replaces the 1
    store.rate(hi_b, "alice", 1)
    store.rate(hi_c, "bob", 4)
    store.rate(hi_c, "alice", 2)  # hi_c's mean is 3
    store.rate(bye_a, "bob", 3)
    store.rate(bye_b, "bob", 3)  # equal: no pair
    store.prefer(bye_b, bye_a, "carol")
    return store


def _load(path: Path, tmp_path: Path) -> list[dict]:
    import datasets

    dataset = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    return dataset.to_list()


def test_preference_export(rated: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "preference.jsonl"
    assert export_jsonl(rated, "preference", path) == 4
    rows = _load(path, tmp_path)
    assert rows == [
        {"prompt": "Say bye", "chosen": "Ciao", "rejected": "Bye"},
        {"prompt": EMOJI_PROMPT, "chosen": "Hello! 😊", "rejected": "'; DROP TABLE x; --"},
        {"prompt": EMOJI_PROMPT, "chosen": "Hello! 😊", "rejected": "Hey"},
        {"prompt": EMOJI_PROMPT, "chosen": "Hey", "rejected": "'; DROP TABLE x; --"},
    ]


def test_unpaired_export(rated: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "unpaired.jsonl"
    assert export_jsonl(rated, "unpaired", path) == 6
    rows = _load(path, tmp_path)
    assert [(r["completion"], r["label"]) for r in rows] == [
        ("Hello! 😊", True),
        ("'; DROP TABLE x; --", False),
        ("Hey", True),
        ("Hey", False),
        ("Bye", False),
        ("Ciao", False),
    ]
    assert set(rows[0]) == {"prompt", "completion", "label"}


def test_ratings_export(rated: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "ratings.jsonl"
    assert export_jsonl(rated, "ratings", path) == 7  # alice's superseded 1 is kept, marked
    rows = _load(path, tmp_path)
    assert [(r["score"], r["status"]) for r in rows[:2]] == [(1, "superseded"), (5, "current")]
    assert set(rows[0]) == {
        "rating_id",
        "prompt_id",
        "prompt",
        "page_id",
        "generation_id",
        "completion",
        "score",
        "comment",
        "rater",
        "adapter_version",
        "created_at",
        "status",
        "guideline_version",
        "submission_id",
        "best",
        "tie",
        "none_good",
        "flag",
        "flag_reason",
    }
    lovely = rows[1]
    assert (lovely["prompt"], lovely["completion"], lovely["score"], lovely["comment"], lovely["rater"]) == (
        EMOJI_PROMPT,
        "Hello! 😊",
        5,
        "lovely",
        "alice",
    )
    assert lovely["adapter_version"] == 0 and lovely["created_at"].endswith("+00:00")
    assert sorted(r["score"] for r in rows) == [1, 1, 2, 3, 3, 4, 5]
    pages = {r["generation_id"]: r["page_id"] for r in rows}
    assert pages == {g.id: g.page_id for g in (rated.get_generation(i) for i in pages)}
    assert len(set(pages.values())) == 2  # one page per prompt here: each was one request


@pytest.fixture
def submitted(store: FeedbackStore) -> FeedbackStore:
    """Page abcd: ana's submission under guidelines v1 (a 5, b 4, c 2; a and b tied best; d flagged),
    carol's (c 5, picked), undone. Page xyz: ben's none-is-good submission (x 4, y 1, z unrated)."""
    store.write_guidelines("Be fair.", "admin")
    pages = {}
    for texts in ("abcd", "xyz"):
        prompt = store.add_prompt(f"Judge {texts}")
        made = store.record_generations(prompt, 0, [NewGeneration(t) for t in texts], rater="ana")
        pages[texts] = (made[0].page_id, {g.text: g.id for g in made})
    page, ids = pages["abcd"]
    store.submit_page(page, "ana", {ids["a"]: 5, ids["b"]: 4, ids["c"]: 2}, [ids["a"], ids["b"]], tie=True,
                      flags=[Flag(ids["d"], "off_prompt", "talks about cats")])
    store.show_page(page, "carol")
    store.submit_page(page, "carol", {ids["c"]: 5}, [ids["c"]])
    store.undo_last_submission("carol")
    page, ids = pages["xyz"]
    store.show_page(page, "ben")
    store.submit_page(page, "ben", {ids["x"]: 4, ids["y"]: 1}, none_good=True)
    return store


def test_preference_export_leaves_out_ties_undone_and_blocked_chosen(submitted, tmp_path: Path) -> None:
    path = tmp_path / "preference.jsonl"
    assert export_jsonl(submitted, "preference", path) == 6
    rows = [(r["chosen"], r["rejected"]) for r in _load(path, tmp_path)]
    # the tie's picks (a and b over c and d), then the rating pairs a > c, b > c: never a over b (tied),
    # nothing of carol's (undone), not x over y (none is good on that page)
    assert rows == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("a", "c"), ("b", "c")]


def test_unpaired_export_labels_none_is_good_and_flagged_undesirable(submitted, tmp_path: Path) -> None:
    path = tmp_path / "unpaired.jsonl"
    assert export_jsonl(submitted, "unpaired", path) == 6
    labels = [(r["completion"], r["label"]) for r in _load(path, tmp_path)]
    assert labels == [("a", True), ("b", True), ("c", False), ("x", False), ("y", False), ("z", False)]


def test_ratings_export_keeps_every_fact_of_a_submission(submitted, tmp_path: Path) -> None:
    path = tmp_path / "ratings.jsonl"
    assert export_jsonl(submitted, "ratings", path) == 8
    by = {(r["rater"], r["completion"]): r for r in _load(path, tmp_path)}
    a, c, d = by["ana", "a"], by["ana", "c"], by["ana", "d"]
    assert (a["tie"], a["best"], a["guideline_version"], a["status"]) == (True, True, 1, "current")
    assert (c["tie"], c["best"]) == (False, False)
    assert (d["score"], d["flag"], d["flag_reason"], d["rating_id"]) == (None, "off_prompt", "talks about cats", None)
    assert (by["carol", "c"]["status"], by["carol", "c"]["score"]) == ("undone", 5)
    assert [(by["ben", t]["score"], by["ben", t]["none_good"]) for t in "xyz"] == [(4, True), (1, True), (None, True)]
    assert len({r["submission_id"] for r in by.values()}) == 3


def test_rating_pairs_come_from_one_page(store: FeedbackStore, tmp_path: Path) -> None:
    prompt = store.add_prompt("Same prompt, two raters")
    ana = store.record_generations(
        prompt, 0, [NewGeneration("ana good"), NewGeneration("ana bad")], rater="ana"
    )
    [ben] = store.record_generations(prompt, 0, [NewGeneration("ben middling")], rater="ben")
    for generation, rater, score in ((ana[0], "ana", 5), (ana[1], "ana", 1), (ben, "ben", 3)):
        store.rate(generation.id, rater, score)
    path = tmp_path / "preference.jsonl"
    assert export_jsonl(store, "preference", path) == 1  # ben's candidate was never beside ana's
    assert _load(path, tmp_path) == [
        {"prompt": "Same prompt, two raters", "chosen": "ana good", "rejected": "ana bad"}
    ]


def _python_m_db(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "db", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_command_line_from_another_directory(rated: FeedbackStore, store_url: str, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _python_m_db(
        "export", "--db", store_url, "--format", "unpaired", "--out", "out/kto.jsonl", cwd=elsewhere
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 6 unpaired rows" in result.stderr
    lines = (elsewhere / "out" / "kto.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["completion"] == "Hello! 😊"

    fresh = tmp_path / "new" / "feedback.db"
    result = _python_m_db("upgrade", "--db", str(fresh), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "revision 0006" in result.stderr and fresh.exists()


def test_preference_export_of_a_huge_page_is_bounded_and_lazy(store: FeedbackStore) -> None:
    from collections.abc import Iterator

    from db.export import MAX_RATING_PAIRS_PER_PAGE, preference_rows

    prompt = store.add_prompt("One prompt, 2,000 candidates")
    made = store.record_generations(prompt, 0, [NewGeneration(f"c{i}") for i in range(2000)], rater="ana")
    store.submit_page(made[0].page_id, "ana", {g.id: 1 + i % 5 for i, g in enumerate(made)})  # ~1.6M pairs unbounded
    rows = preference_rows(store, max_pairs_per_page=50)
    assert isinstance(rows, Iterator)  # made as they are read, never all at once
    assert sum(1 for _ in rows) == 50
    capped = list(preference_rows(store))
    assert len(capped) == MAX_RATING_PAIRS_PER_PAGE
    scores = {g.text: 1 + i % 5 for i, g in enumerate(made)}
    assert all(scores[r["chosen"]] > scores[r["rejected"]] for r in capped)
    assert {scores[r["chosen"]] - scores[r["rejected"]] for r in capped} == {1}  # neighbouring ranks first
    with pytest.raises(ValueError, match="max_pairs_per_page"):
        next(preference_rows(store, max_pairs_per_page=0))

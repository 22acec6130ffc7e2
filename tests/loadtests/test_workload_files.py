"""Workloads: mixed-length texts per model, and the JSON Lines file load tests read."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.workload import (
    WorkloadItem,
    build_workload,
    mixed_length_texts,
    read_workload,
    task_texts,
    texts_by_model,
    write_workload,
)


@pytest.mark.parametrize("task", ["dates", "numbers", "phrasebook"])
def test_task_texts_are_distinct_deterministic_and_include_both_length_tails(task: str) -> None:
    texts = task_texts(task, 40, seed=7)
    assert len(texts) == 40 == len(set(texts))
    assert texts == task_texts(task, 40, seed=7)
    # The widest draw's extremes are kept, so the spread is wide: the longest is at least twice the shortest.
    assert max(map(len, texts)) >= 2 * min(map(len, texts))


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="no text generator"):
        task_texts("poetry", 5)


def test_mixed_length_texts_vary_widely() -> None:
    texts = mixed_length_texts(50, seed=3)
    lengths = sorted(len(text) for text in texts)
    assert len(texts) == 50
    assert lengths[len(lengths) // 5] < 40  # bare names
    assert lengths[-len(lengths) // 5] > 120  # three clauses


def test_build_workload_skips_models_without_a_generator() -> None:
    items = build_workload({"dates": "dates", "mine": "tsv"}, per_model=10)
    assert {item.model for item in items} == {"dates"}
    assert len(items) == 10 and all(item.task == "dates" for item in items)


def test_workload_file_round_trip(tmp_path: Path) -> None:
    items = [
        WorkloadItem("dates", "21.11.2026", "dates"),
        WorkloadItem("numbers", "mille deux", "numbers"),
        WorkloadItem("x", 'a "quoted" text with ünïcode'),
    ]
    path = tmp_path / "workload.jsonl"
    assert write_workload(path, items) == 3
    assert read_workload(path) == items
    assert texts_by_model(items) == {"dates": ["21.11.2026"], "numbers": ["mille deux"], "x": [items[2].text]}


def test_malformed_workload_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "workload.jsonl"
    path.write_text('{"model": "dates", "text": "1.2.2003"}\n\n{"model": "dates"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"workload.jsonl:3"):
        read_workload(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_workload(path)

"""Workloads: realistic, mixed-length texts to send to a server, per model, and the file they live in.

Texts come from the same generators the models were trained with, drawn with another seed, so requests
look like real inputs (dates in 27 locales, number words in German and French, phrasebook sentences in six
languages) and never one repeated string. Each set is widened at both ends: the shortest and the longest
texts of a larger draw are always included, so short and long requests are both present.

A workload file is JSON Lines, one request text per line: `{"model": "dates", "text": "21.11.2026"}`
(optional `"task"`). Load tests read it; anyone can write their own for their own models.

    python -m loadtests.workload --out build/loadtest/workload.jsonl --model dates --model numbers
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

#: Tasks this module can generate texts for (the bundled tasks and the benchmark's phrasebook corpus).
GENERATED_TASKS = ("dates", "numbers", "phrasebook")


@dataclass(frozen=True)
class WorkloadItem:
    """One request text for the model named `model`; `task` says where the text came from."""

    model: str
    text: str
    task: str = ""


def task_texts(task: str, count: int, *, seed: int = 2024, tail_fraction: float = 0.1) -> list[str]:
    """`count` distinct source texts of a generated task, in random order, with the shortest and the
    longest texts of a draw four times larger making up `tail_fraction` of them."""
    if task not in GENERATED_TASKS:
        raise ValueError(f"no text generator for task {task!r}; known: {', '.join(GENERATED_TASKS)}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    pool = _draw(task, 4 * count, seed)
    rng = random.Random(seed)
    by_length = sorted(pool, key=lambda text: (len(text), text))
    tail = max(1, int(count * tail_fraction / 2)) if count >= 4 else 0
    chosen = by_length[:tail] + by_length[len(by_length) - tail :] if tail else []
    rest = [text for text in pool if text not in set(chosen)]
    rng.shuffle(rest)
    chosen = list(dict.fromkeys(chosen + rest[: count - len(chosen)]))
    rng.shuffle(chosen)
    return chosen[:count]


def mixed_length_texts(count: int, *, seed: int = 2025) -> list[str]:
    """Phrasebook requests whose lengths vary widely: 40% a bare name (a few tokens), 20% one clause,
    40% three clauses (tens of tokens), shuffled."""
    from loadtests.corpus import phrase_pairs

    short = [pair.source for pair in phrase_pairs(int(count * 0.4) + 1, seed=seed, short_fraction=1.0)]
    medium = [
        pair.source
        for pair in phrase_pairs(int(count * 0.2) + 1, seed=seed + 1, min_clauses=1, max_clauses=1, short_fraction=0.0)
    ]
    long = [
        pair.source for pair in phrase_pairs(count, seed=seed + 2, min_clauses=3, max_clauses=3, short_fraction=0.0)
    ]
    texts = short + medium + long[: max(0, count - len(short) - len(medium))]
    random.Random(seed).shuffle(texts)
    return texts[:count]


def _draw(task: str, count: int, seed: int) -> list[str]:
    if task == "dates":
        from export.data import make_dates

        # Plain dates, so that the benchmark's inputs stay what earlier reports measured.
        splits = make_dates(seed=seed, n_train=0, n_valid=0, n_test=count, written=False)
        return [pair.source for pair in splits.test]
    if task == "numbers":
        from export.data.numbers import DEFAULT_SOURCE_LANGUAGES, number_words

        # The numbers task's inputs: a number written out in German or French, in the range the default
        # numbers model is trained on.
        rng = random.Random(seed)
        top = _numbers_range()
        numbers = rng.sample(range(top + 1), min(count, top + 1))
        return [number_words(number, rng.choice(DEFAULT_SOURCE_LANGUAGES)) for number in numbers]
    from loadtests.corpus import phrase_pairs

    return [pair.source for pair in phrase_pairs(count, seed=seed)]


def _numbers_range() -> int:
    """The largest number of the default numbers model's recipe (export/zoo.py)."""
    from export.zoo import DEFAULT_MODELS

    for entry in DEFAULT_MODELS:
        if entry.name == "numbers":
            return int(entry.training.get("data_options", {}).get("max_number", 9999))
    return 9999


def build_workload(models: dict[str, str], per_model: int = 200, *, seed: int = 2024) -> list[WorkloadItem]:
    """Items for every model whose task (the value, e.g. 'dates') can be generated; others are skipped."""
    items: list[WorkloadItem] = []
    for model, task in sorted(models.items()):
        if task not in GENERATED_TASKS:
            continue
        items.extend(WorkloadItem(model, text, task) for text in task_texts(task, per_model, seed=seed))
    return items


def write_workload(path: Path | str, items: Iterable[WorkloadItem]) -> int:
    """Write items as JSON Lines; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(asdict(item), ensure_ascii=False) for item in items]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def read_workload(path: Path | str) -> list[WorkloadItem]:
    """Read a workload file; raises ValueError naming the line for a malformed one."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            item = WorkloadItem(
                model=str(record.get("model", "")), text=str(record["text"]), task=str(record.get("task", ""))
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}:{number}: not a workload line ({error}): {line[:80]!r}") from error
        if not item.text:
            raise ValueError(f"{path}:{number}: empty text")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: the workload is empty")
    return items


def texts_by_model(items: Sequence[WorkloadItem]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for item in items:
        grouped.setdefault(item.model, []).append(item.text)
    return grouped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.workload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON Lines file to write")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME[=TASK]",
        help=f"a model and the task its texts come from ({', '.join(GENERATED_TASKS)}); "
        "TASK defaults to NAME (repeatable)",
    )
    parser.add_argument("--per-model", type=int, default=200, help="texts per model (default 200)")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    models = {}
    for entry in args.model or ["dates", "numbers"]:
        name, _, task = entry.partition("=")
        models[name] = task or name
    unknown = [task for task in models.values() if task not in GENERATED_TASKS]
    if unknown:
        parser.error(f"no text generator for {unknown}; known tasks: {', '.join(GENERATED_TASKS)}")
    written = write_workload(args.out, build_workload(models, args.per_model, seed=args.seed))
    print(f"wrote {written} texts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

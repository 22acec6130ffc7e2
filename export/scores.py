"""What a default model's score says: the scores of its right and wrong answers, and thresholds to flag answers.

`python -m export.scores models/dates/2 [--seeds 5]` decodes, through the serving stack (greedy, as
`export/acceptance.py` does), the as-written acceptance sets of several seeds (text as software and people
write it, inside the model's claim) and a set of inputs outside the claim (dates: years outside 1900-2099,
locales the model does not list, a letter of a word mistyped; numbers: 1000-1999, Spanish and Italian, a
letter mistyped), whose references are known, so every answer is right or wrong. It prints, as JSON, the
quantiles of the scores of right and wrong answers in each set, and for a few thresholds (and for the one
that flags 1% of the right as-written answers) the share of right answers a client would flag (score below the
threshold) and the share of wrong answers it would catch.
README.md ("What a low score means") quotes these figures. No torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

from export.acceptance import AS_WRITTEN, Served, acceptance_set, score_summary, translate_as_served
from export.data import Pair

#: Thresholds the report evaluates (scores are summed natural-log probabilities, <= 0).
THRESHOLDS = (-0.01, -0.02, -0.05, -0.1, -0.2, -0.3, -0.5, -1.0)

#: Locales the dates model does not claim, for the outside-the-claim set.
UNCLAIMED_LOCALES = ("da", "ca", "hr", "lt", "bg", "sk", "nb", "et")


def outside_the_claim(task: str, seed: int, count: int = 2000) -> list[Pair]:
    """Inputs with known references that the default model of `task` does not claim to translate."""
    rng = random.Random(seed)
    pairs: list[Pair] = []
    if task == "dates":
        from export.data.dates import DateFormat, render_date, select_date_formats

        formats, _ = select_date_formats()
        claimed = [fmt for found in formats.values() for fmt in found]
        unclaimed, _ = select_date_formats(UNCLAIMED_LOCALES)
        foreign = [fmt for code in UNCLAIMED_LOCALES for fmt in unclaimed[code]]
        while len(pairs) < count:
            kind = len(pairs) % 3
            if kind == 0:  # a year outside the range
                year = rng.choice((rng.randint(1800, 1899), rng.randint(2100, 2199)))
                day = datetime.date(year, rng.randint(1, 12), rng.randint(1, 28))
                fmt: DateFormat = rng.choice(claimed)
            else:
                day = datetime.date(rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28))
                fmt = rng.choice(foreign if kind == 1 else claimed)
            text = render_date(day, fmt)
            if kind == 2:
                text = _mistyped(text, rng)
            pairs.append(Pair(text, day.isoformat()))
        return pairs
    if task == "numbers":
        from export.data.numbers import number_words

        while len(pairs) < count:
            kind = len(pairs) % 3
            if kind == 0:
                number = rng.randint(1000, 1999)
                language = rng.choice(("de", "fr"))
            else:
                number = rng.randint(0, 999)
                language = rng.choice(("es", "it")) if kind == 1 else rng.choice(("de", "fr"))
            text = number_words(number, language)
            if kind == 2:
                text = _mistyped(text, rng)
            pairs.append(Pair(text, number_words(number, "en")))
        return pairs
    raise ValueError(f"no outside-the-claim set for task {task!r}")


def _mistyped(text: str, rng: random.Random) -> str:
    """One letter of a word replaced by the letter next to it in the alphabet, or dropped."""
    letters = [index for index, char in enumerate(text) if char.isalpha()]
    if not letters:
        return text
    index = rng.choice(letters)
    if rng.random() < 0.5:
        return text[:index] + text[index + 1 :]
    return text[:index] + chr(ord(text[index]) + 1) + text[index + 1 :]


def flagged(scores: list[float], threshold: float) -> float:
    """The share of `scores` below `threshold`."""
    return round(sum(1 for value in scores if value < threshold) / max(len(scores), 1), 5)


def study(version_dir: Path, seeds: int) -> dict:
    """The report described in the module docstring, for the model version in `version_dir`."""
    from export.zoo import DEFAULT_MODELS

    entry = next(entry for entry in DEFAULT_MODELS if entry.name == version_dir.parent.name)
    written: list[tuple[Pair, Served]] = []
    for seed in range(1000, 1000 + seeds):
        inputs = acceptance_set(
            entry.task, seed, training_seed=entry.training_seed, data_options=entry.data_options, written=True
        )
        answers = translate_as_served(version_dir, [pair.source for pair in inputs.pairs])
        written.extend(zip(inputs.pairs, answers, strict=True))
    outside = outside_the_claim(entry.task, seed=77)
    outside_answers = translate_as_served(version_dir, [pair.source for pair in outside])
    report: dict = {"model": str(version_dir), "thresholds": {}}
    sets = {AS_WRITTEN: written, "outside_the_claim": list(zip(outside, outside_answers, strict=True))}
    scores: dict[str, dict[str, list[float]]] = {}
    for name, answered in sets.items():
        right = [answer.score for pair, answer in answered if answer.text == pair.target]
        wrong = [answer.score for pair, answer in answered if answer.text != pair.target]
        scores[name] = {"right": right, "wrong": wrong}
        report[name] = {"examples": len(answered), **score_summary(right, wrong)}
    # The threshold that flags 1% of the right answers to text as people write it, and what it catches.
    right = sorted(scores[AS_WRITTEN]["right"])
    suggested = right[len(right) // 100] if right else 0.0
    report["suggested"] = {
        "threshold": round(suggested, 4),
        "right_flagged (as_written)": flagged(scores[AS_WRITTEN]["right"], suggested),
        "wrong_caught (as_written)": flagged(scores[AS_WRITTEN]["wrong"], suggested),
        "wrong_caught (outside)": flagged(scores["outside_the_claim"]["wrong"], suggested),
    }
    for threshold in THRESHOLDS:
        report["thresholds"][str(threshold)] = {
            "right_flagged (as_written)": flagged(scores[AS_WRITTEN]["right"], threshold),
            "wrong_caught (as_written)": flagged(scores[AS_WRITTEN]["wrong"], threshold),
            "right_flagged (outside)": flagged(scores["outside_the_claim"]["right"], threshold),
            "wrong_caught (outside)": flagged(scores["outside_the_claim"]["wrong"], threshold),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.scores", description=__doc__.split("\n\n")[0])
    parser.add_argument("version_dir", type=Path, help="a default model's version folder, e.g. models/dates/2")
    parser.add_argument("--seeds", type=int, default=5, help="as-written sets to pool (seeds 1000, 1001, ...)")
    arguments = parser.parse_args(argv)
    print(json.dumps(study(arguments.version_dir, arguments.seeds), indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Accuracy as users meet it: fresh inputs over everything a default model claims, decoded as the server does.

A default model's bar is checked here, not on its test split: the test split is a sample of the training
distribution that happened to stop training, while users send any date in any locale and format the model
lists, written as their software or their fingers write it. So the check draws new inputs with a seed no
training run used, covering every claimed locale x format (dates) or every number of the range in every
language (numbers), in two sets:

- `plain`: the text in its plain form (dates without bidi marks and with plain single spaces; number words as
  num2words spells them);
- `as written`: the same claims as software and people write them (export/data/written.py): Babel's raw output
  with its U+202F, U+00A0 and U+200F, spaces added or left out, full-width or native digits, capitals,
  invisible characters; both French spellings, German compounds written apart, ...

Each set is scored overall and per group (dates: the script of the locale, LOCALE_GROUPS; numbers: the
language), and a model meets its bar only when every group of both sets does. The inputs are decoded through
the serving stack (the in-process engine client + Dataplane on onnxruntime), the path a `Translate` call
takes, and the score the server returns with each answer is kept, so the build can say how the scores of right
and wrong answers differ.

Nothing here imports torch: the tests run this on the shipped models with the serving dependencies and the
data generators (Babel, num2words) only.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from export.data import Pair

#: Fresh dates drawn per locale x format, at least: 134 formats x 15 = 2,010 dates.
DATES_PER_FORMAT = 15

#: ... and at least this many per locale group, so that one error in a small group (Greek: 3 formats) weighs
#: 0.25% or less.
DATES_PER_GROUP = 400

#: Texts per Translate call when decoding an acceptance set (the server's default per-call limit).
TEXTS_PER_CALL = 64

#: The names of the two sets every default model is checked on.
PLAIN, AS_WRITTEN = "plain", "as_written"
SET_NAMES = (PLAIN, AS_WRITTEN)


@dataclass(frozen=True)
class AcceptanceSet:
    """Inputs a model must translate, each with the group it is scored in (locale group, or language), a finer
    label (locale/format, or language/spelling) and the changes made to its plain form ('' for none)."""

    name: str
    pairs: list[Pair]
    groups: list[str]
    details: list[str]
    changes: list[str]
    description: str


@dataclass
class Served:
    """The best answer to one input as the server gives it: its text and score; `refused` when the server
    refused the input (too long for the model, say), which counts as wrong."""

    text: str
    score: float
    refused: str = ""


@dataclass
class Acceptance:
    """How a model did on an AcceptanceSet: exact match overall and per group, the first errors, and the scores
    of its right and wrong answers."""

    name: str
    exact_match: float
    examples: int
    errors: int
    groups: dict[str, dict[str, float | int]]
    description: str
    changes: dict[str, dict[str, float | int]] = field(default_factory=dict)
    worst_details: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, float | int]] = field(default_factory=dict)
    examples_of_errors: list[dict[str, str | float]] = field(default_factory=list)

    def below(self, bar: float) -> list[str]:
        """The groups whose exact match is under `bar` (empty when the set meets it)."""
        return [group for group, figures in self.groups.items() if figures["exact_match"] < bar]

    def to_dict(self) -> dict:
        return {
            "exact_match": round(self.exact_match, 5),
            "examples": self.examples,
            "errors": self.errors,
            "groups": self.groups,
            "inputs": self.description,
            "changes": self.changes,
            "worst": self.worst_details,
            "scores": self.scores,
            "examples_of_errors": self.examples_of_errors,
        }


def acceptance_set(
    task: str, seed: int, *, training_seed: int, data_options: dict | None = None, written: bool = False
) -> AcceptanceSet:
    """Fresh inputs for a default model of `task` ('dates' or 'numbers'), plain or (`written`) as written.

    dates: at least DATES_PER_FORMAT new dates in every locale x format and DATES_PER_GROUP in every locale
    group, drawn with `seed`, none of them (once normalised) a source of the training splits that
    `training_seed` and `data_options` generate; the plain and written sets of one seed hold the same days.
    numbers: every number of the range in every source language (plain: num2words' spelling; written: every
    spelling, each changed as people write it, with `seed`).
    """
    options = dict(data_options or {})
    if task == "dates":
        return _dates_set(seed, training_seed, options, written)
    if task == "numbers":
        return _numbers_set(seed, options, written)
    raise ValueError(f"no acceptance set for task {task!r}: only the default tasks 'dates' and 'numbers' have one")


def acceptance_sets(
    task: str, seed: int, *, training_seed: int, data_options: dict | None = None
) -> dict[str, AcceptanceSet]:
    """Both sets of `task` for `seed`: {PLAIN: ..., AS_WRITTEN: ...}."""
    return {
        name: acceptance_set(
            task, seed, training_seed=training_seed, data_options=data_options, written=name == AS_WRITTEN
        )
        for name in SET_NAMES
    }


def _dates_set(seed: int, training_seed: int, options: dict, written: bool) -> AcceptanceSet:
    from export.data.dates import (
        DEFAULT_LOCALES,
        NUMERIC_GROUP,
        draw_dates,
        locale_group,
        select_date_formats,
    )

    range_options = {
        key: options[key] for key in ("locales", "first_year", "last_year", "max_source_chars") if key in options
    }
    locales = tuple(range_options.get("locales", DEFAULT_LOCALES))
    formats, _ = select_date_formats(locales)
    formats_per_group = Counter(locale_group(code) for code in formats for _ in formats[code])
    per_format = {
        code: max(DATES_PER_FORMAT, math.ceil(DATES_PER_GROUP / formats_per_group[locale_group(code)]))
        for code in (*locales, NUMERIC_GROUP)
        if formats[code]
    }
    training = _training_sources(training_seed, json.dumps(options, sort_keys=True))
    drawn = draw_dates(seed, per_format, exclude=training, written=written, **range_options)
    kind = "as software and people write them" if written else "in their plain form"
    combinations = sum(len(found) for found in formats.values())
    return AcceptanceSet(
        name=AS_WRITTEN if written else PLAIN,
        pairs=[date.pair for date in drawn],
        groups=[locale_group(date.format.locale) for date in drawn],
        details=[f"{date.format.locale}/{date.format.name}" for date in drawn],
        changes=[date.written.label if written else "" for date in drawn],
        description=f"{len(drawn)} new dates {kind}: at least {DATES_PER_FORMAT} in each of the {combinations} "
        f"locale x format combinations and {DATES_PER_GROUP} in each locale group, seed {seed}, none from the "
        "training splits",
    )


@functools.lru_cache(maxsize=4)
def _training_sources(training_seed: int, options: str) -> frozenset[str]:
    """The sources of the dates training splits (`options`: the task's keyword arguments as JSON), for excluding
    them from fresh draws; kept for the plain and the written set of a seed."""
    from export.data.dates import make_dates

    return frozenset(pair.source for pair in make_dates(seed=training_seed, **json.loads(options)).all_pairs())


def _numbers_set(seed: int, options: dict, written: bool) -> AcceptanceSet:
    import random

    from export.data.numbers import (
        DEFAULT_SOURCE_LANGUAGES,
        STANDARD_SPELLING,
        number_spellings,
        number_words,
        write_number,
    )

    low, high = options.get("min_number", 0), options.get("max_number", 9999)
    languages = tuple(options.get("source_languages", DEFAULT_SOURCE_LANGUAGES))
    target_language = options.get("target_language", "en")
    rng = random.Random(f"{seed}/written")
    pairs, groups, details, changes = [], [], [], []
    for number in range(low, high + 1):
        target = number_words(number, target_language)
        for language in languages:
            spellings = number_spellings(number, language) if written else {STANDARD_SPELLING: ""}
            for spelling, text in spellings.items():
                if written:
                    # Every input differs from the plain set: another spelling, or changes made to num2words'.
                    source = write_number(text, language, rng, changed=True if spelling == STANDARD_SPELLING else None)
                    pairs.append(Pair(source.text, target))
                    kinds = source.kinds if spelling == STANDARD_SPELLING else (f"{spelling} spelling", *source.kinds)
                    changes.append("+".join(kinds))
                else:
                    pairs.append(Pair(number_words(number, language), target))
                    changes.append("")
                groups.append(language)
                details.append(f"{language}/{spelling}")
    what = "every spelling, written as people write it" if written else "num2words' spelling"
    return AcceptanceSet(
        name=AS_WRITTEN if written else PLAIN,
        pairs=pairs,
        groups=groups,
        details=details,
        changes=changes,
        description=f"every number {low}-{high} in {', '.join(languages)} (exhaustive), {what}"
        + (f", seed {seed}" if written else ""),
    )


def translate_as_served(version_dir: Path, texts: Sequence[str], *, beam_size: int = 0) -> list[Served]:
    """The best translation of every text by the model version in `version_dir` (`REPO/NAME/VERSION`), with
    its score, decoded by the server's own engine client and Dataplane on onnxruntime's CPU provider."""
    return asyncio.run(_translate_as_served(Path(version_dir), list(texts), beam_size))


async def _translate_as_served(version_dir: Path, texts: list[str], beam_size: int) -> list[Served]:
    from service.dataplane import Dataplane
    from service.engine import DecodeOptions
    from service.engine_client.in_process import InProcessClient
    from service.errors import InvalidRequest
    from service.settings import Settings

    name, version = version_dir.parent.name, version_dir.name
    settings = Settings(
        model_repository=version_dir.parent.parent,
        metrics_port=0,
        provider="cpu",
        default_model=name,
        loaded_versions=0,
        max_texts_per_request=TEXTS_PER_CALL,
        # Every text is queued at once and waits its turn: no bound on the queue or on the wait.
        max_waiting_requests=max(len(texts), 1),
        max_queue_wait_ms=0.0,
    )
    client = InProcessClient(settings, only={name})
    await client.start()
    try:
        dataplane = Dataplane(client, settings)
        options = DecodeOptions(beam_size=beam_size)

        async def call(chunk: list[str]) -> list[Served]:
            try:
                outcome = await dataplane.translate(name, version, chunk, options)
            except InvalidRequest as error:
                if len(chunk) == 1:
                    return [Served("", -math.inf, refused=str(error))]
                # One text the model refuses fails its whole call: ask for each text on its own.
                return [served for text in chunk for served in await call([text])]
            return [Served(t.best.text, float(t.best.score)) for t in outcome.translations]

        chunks = [texts[start : start + TEXTS_PER_CALL] for start in range(0, len(texts), TEXTS_PER_CALL)]
        answers = await asyncio.gather(*(call(chunk) for chunk in chunks))
    finally:
        await client.stop(0.0)
    return [served for chunk in answers for served in chunk]


def check(version_dir: Path, inputs: AcceptanceSet, *, beam_size: int = 0) -> Acceptance:
    """Decode `inputs` with the model in `version_dir` as the server would, and score them."""
    served = translate_as_served(version_dir, [pair.source for pair in inputs.pairs], beam_size=beam_size)
    return score(inputs, served)


def score(inputs: AcceptanceSet, served: Sequence[Served]) -> Acceptance:
    """Exact match of `served` answers to `inputs`, per group, per kind of change and per detail, and the
    distribution of the scores of right and wrong answers."""
    totals: dict[str, Counter[str]] = {"group": Counter(), "change": Counter(), "detail": Counter()}
    wrong: dict[str, Counter[str]] = {"group": Counter(), "change": Counter(), "detail": Counter()}
    right_scores: list[float] = []
    wrong_scores: list[float] = []
    errors: list[dict[str, str | float]] = []
    for index, (pair, answer) in enumerate(zip(inputs.pairs, served, strict=True)):
        labels = {
            "group": inputs.groups[index],
            "detail": inputs.details[index],
            # Each kind of change on its own ('upper case', 'missing spaces'), however they were combined.
            "change": inputs.changes[index],
        }
        kinds = [kind for kind in labels["change"].split("+") if kind]
        for scope in ("group", "detail"):
            totals[scope][labels[scope]] += 1
        for kind in kinds:
            totals["change"][kind] += 1
        if answer.text == pair.target and not answer.refused:
            right_scores.append(answer.score)
            continue
        wrong_scores.append(answer.score)
        for scope in ("group", "detail"):
            wrong[scope][labels[scope]] += 1
        for kind in kinds:
            wrong["change"][kind] += 1
        error: dict[str, str | float] = {
            "source": pair.source,
            "expected": pair.target,
            "output": answer.text,
            "score": round(answer.score, 4),
            "group": labels["detail"],
        }
        if labels["change"]:
            error["changes"] = labels["change"]
        if answer.refused:
            error["refused"] = answer.refused
        errors.append(error)

    def figures(scope: str, key: str) -> dict[str, float | int]:
        total, missed = totals[scope][key], wrong[scope][key]
        return {"exact_match": round(1.0 - missed / total, 5), "examples": total, "errors": missed}

    details = totals["detail"]
    worst = sorted(wrong["detail"], key=lambda key: (wrong["detail"][key] / details[key], key), reverse=True)[:5]
    return Acceptance(
        name=inputs.name,
        exact_match=1.0 - len(errors) / max(len(inputs.pairs), 1),
        examples=len(inputs.pairs),
        errors=len(errors),
        groups={group: figures("group", group) for group in sorted(totals["group"])},
        description=inputs.description,
        changes={kind: figures("change", kind) for kind in sorted(totals["change"])},
        worst_details={key: round(1.0 - wrong["detail"][key] / details[key], 4) for key in worst},
        scores=score_summary(right_scores, wrong_scores),
        examples_of_errors=errors[:10],
    )


def score_summary(right: Sequence[float], wrong: Sequence[float]) -> dict[str, dict[str, float | int]]:
    """Quantiles of the scores (summed log probabilities, <= 0) of right and wrong answers."""

    def quantile(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 4)

    summary: dict[str, dict[str, float | int]] = {}
    for name, values in (("right", sorted(right)), ("wrong", sorted(v for v in wrong if math.isfinite(v)))):
        if not values:
            summary[name] = {"count": 0}
            continue
        summary[name] = {
            "count": len(values),
            "min": round(values[0], 4),
            "p01": quantile(values, 0.01),
            "p05": quantile(values, 0.05),
            "median": quantile(values, 0.5),
            "max": round(values[-1], 4),
        }
    return summary


def check_all(version_dir: Path, sets: dict[str, AcceptanceSet], *, beam_size: int = 0) -> dict[str, Acceptance]:
    """check() of every set, by set name."""
    return {name: check(version_dir, inputs, beam_size=beam_size) for name, inputs in sets.items()}


def group_table(results: dict[str, Acceptance]) -> list[tuple[str, str, float, int, int]]:
    """(set, group, exact match, examples, errors) rows, for printing."""
    rows = []
    for name, result in results.items():
        for group, figures in result.groups.items():
            rows.append((name, group, float(figures["exact_match"]), int(figures["examples"]), int(figures["errors"])))
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m export.acceptance MODELS/NAME/VERSION --seed S [--beam B]`: a version's figures on both sets of
    its task (the task and recipe options of the default model of that name) as JSON."""
    import argparse

    from export.zoo import DEFAULT_MODELS

    parser = argparse.ArgumentParser(prog="python -m export.acceptance", description=main.__doc__)
    parser.add_argument("version_dir", type=Path, help="a version folder, e.g. models/dates/2")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--beam", type=int, default=0, help="beam size (0: greedy)")
    parser.add_argument("--model", default=None, help="the default model whose task and recipe to use")
    arguments = parser.parse_args(argv)
    name = arguments.model or arguments.version_dir.parent.name
    entry = next(entry for entry in DEFAULT_MODELS if entry.name == name)
    sets = acceptance_sets(
        entry.task, arguments.seed, training_seed=entry.training_seed, data_options=entry.data_options
    )
    results = check_all(arguments.version_dir, sets, beam_size=arguments.beam)
    print(json.dumps({name: result.to_dict() for name, result in results.items()}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

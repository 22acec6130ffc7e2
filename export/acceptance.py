"""Accuracy as users meet it: fresh inputs over everything a default model claims, decoded as the server does.

A default model's bar is checked here, not on its test split: the test split is a sample of the training
distribution that happened to stop training, while users send any date in any locale and format the model
lists. So the check draws new inputs with a seed no training run used, covering every claimed locale x
format (dates) or every number of the range in every language (numbers), and decodes them through the
serving stack (ModelManager + Dataplane on onnxruntime, greedy), the path a `Translate` call takes.

Nothing here imports torch: the tests run this on the shipped models with the serving dependencies and the
data generators (Babel, num2words) only.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from export.data import Pair

#: Fresh dates drawn per locale x format: 134 formats x 15 = 2,010 dates, so one error weighs 0.05%.
DATES_PER_FORMAT = 15

#: Texts per Translate call when decoding an acceptance set (the server's default per-call limit).
TEXTS_PER_CALL = 64


@dataclass(frozen=True)
class AcceptanceSet:
    """Inputs a model must translate, each with the group it belongs to (locale/format, or language)."""

    pairs: list[Pair]
    groups: list[str]
    description: str


@dataclass
class Acceptance:
    """How a model did on an AcceptanceSet: exact match overall and per group, and the first errors."""

    exact_match: float
    examples: int
    errors: int
    worst_groups: dict[str, float]
    description: str
    examples_of_errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "exact_match": round(self.exact_match, 5),
            "examples": self.examples,
            "errors": self.errors,
            "worst_groups": self.worst_groups,
            "inputs": self.description,
            "examples_of_errors": self.examples_of_errors,
        }


def acceptance_set(task: str, seed: int, *, training_seed: int, data_options: dict | None = None) -> AcceptanceSet:
    """Fresh inputs for a default model of `task` ('dates' or 'numbers').

    dates: DATES_PER_FORMAT new dates in every locale x format, drawn with `seed`, none of them a source of
    the training splits that `training_seed` and `data_options` generate. numbers: every number of the range
    in every source language (the whole claim; `seed` plays no part).
    """
    options = dict(data_options or {})
    if task == "dates":
        from export.data.dates import draw_dates, make_dates

        training = make_dates(seed=training_seed, **options)
        range_options = {
            key: options[key] for key in ("locales", "first_year", "last_year", "max_source_chars") if key in options
        }
        drawn = draw_dates(seed, DATES_PER_FORMAT, exclude={p.source for p in training.all_pairs()}, **range_options)
        return AcceptanceSet(
            pairs=[pair for _, pair in drawn],
            groups=[f"{fmt.locale}/{fmt.name}" for fmt, _ in drawn],
            description=f"{DATES_PER_FORMAT} new dates in each of the {len(drawn) // DATES_PER_FORMAT} "
            f"locale x format combinations, seed {seed}, none from the training splits",
        )
    if task == "numbers":
        from export.data.numbers import DEFAULT_SOURCE_LANGUAGES, number_words

        low, high = options.get("min_number", 0), options.get("max_number", 9999)
        languages = tuple(options.get("source_languages", DEFAULT_SOURCE_LANGUAGES))
        target_language = options.get("target_language", "en")
        pairs, groups = [], []
        for number in range(low, high + 1):
            target = number_words(number, target_language)
            for language in languages:
                pairs.append(Pair(number_words(number, language), target))
                groups.append(language)
        return AcceptanceSet(pairs, groups, f"every number {low}-{high} in {', '.join(languages)} (exhaustive)")
    raise ValueError(f"no acceptance set for task {task!r}: only the default tasks 'dates' and 'numbers' have one")


def translate_as_served(version_dir: Path, texts: Sequence[str], *, beam_size: int = 0) -> list[str]:
    """The best translation of every text by the model version in `version_dir` (`REPO/NAME/VERSION`),
    decoded by the server's own engine client and Dataplane on onnxruntime's CPU provider."""
    return asyncio.run(_translate_as_served(Path(version_dir), list(texts), beam_size))


async def _translate_as_served(version_dir: Path, texts: list[str], beam_size: int) -> list[str]:
    from service.dataplane import Dataplane
    from service.engine import DecodeOptions
    from service.engine_client.in_process import InProcessClient
    from service.settings import Settings

    name, version = version_dir.parent.name, version_dir.name
    settings = Settings(
        model_repository=version_dir.parent.parent,
        metrics_port=0,
        provider="cpu",
        default_model=name,
        loaded_versions=0,
        max_texts_per_request=TEXTS_PER_CALL,
        max_waiting_requests=max(len(texts), 1),
    )
    client = InProcessClient(settings, only={name})
    await client.start()
    try:
        dataplane = Dataplane(client, settings)
        options = DecodeOptions(beam_size=beam_size)
        calls = [
            dataplane.translate(name, version, texts[start : start + TEXTS_PER_CALL], options)
            for start in range(0, len(texts), TEXTS_PER_CALL)
        ]
        outcomes = await asyncio.gather(*calls)
    finally:
        await client.stop(0.0)
    return [translation.best.text for outcome in outcomes for translation in outcome.translations]


def check(version_dir: Path, inputs: AcceptanceSet, *, beam_size: int = 0) -> Acceptance:
    """Decode `inputs` with the model in `version_dir` as the server would, and score them."""
    outputs = translate_as_served(version_dir, [pair.source for pair in inputs.pairs], beam_size=beam_size)
    totals: Counter[str] = Counter(inputs.groups)
    wrong: Counter[str] = Counter()
    errors: list[dict[str, str]] = []
    for pair, group, output in zip(inputs.pairs, inputs.groups, outputs, strict=True):
        if output != pair.target:
            wrong[group] += 1
            errors.append({"source": pair.source, "expected": pair.target, "output": output, "group": group})
    worst = sorted(wrong, key=lambda group: (wrong[group] / totals[group], group), reverse=True)[:5]
    return Acceptance(
        exact_match=1.0 - len(errors) / max(len(inputs.pairs), 1),
        examples=len(inputs.pairs),
        errors=len(errors),
        worst_groups={group: round(1.0 - wrong[group] / totals[group], 4) for group in worst},
        description=inputs.description,
        examples_of_errors=errors[:10],
    )

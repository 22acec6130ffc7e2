"""The shipped default models (models/dates/1, models/numbers/1) meet their bars as users meet them.

Fresh inputs drawn with seeds that neither training (13) nor the build's own check (101) used, over every
locale x format (dates) or every number of the range (numbers), decoded by the serving stack on onnxruntime.
No torch: this is what `make serve` serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.acceptance import acceptance_set, check
from export.zoo import DEFAULT_MODELS, DEFAULT_VERSION

pytestmark = pytest.mark.slow  # trains models or starts servers

REPOSITORY = Path(__file__).resolve().parents[2] / "models"
ENTRIES = {entry.name: entry for entry in DEFAULT_MODELS}


def shipped(name: str) -> Path:
    return REPOSITORY / name / str(DEFAULT_VERSION)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_the_shipped_version_was_built_from_the_current_recipe_and_met_its_bar(name: str) -> None:
    document = json.loads((shipped(name) / "model.json").read_text(encoding="utf-8"))
    entry = ENTRIES[name]
    assert document["build"]["fingerprint"] == entry.fingerprint(), (
        f"models/{name} was built from another recipe than export/zoo.py's: run `make models BUILD_ARGS='--only "
        f"{name}'`"
    )
    assert document["build"]["machine"]["cpu"] and document["build"]["machine"]["torch_cpu_capability"]
    acceptance = document["acceptance"]
    assert acceptance["bar"] == entry.bar and acceptance["greedy"]["exact_match"] >= entry.bar
    assert document["parity"]["greedy_identical"] is True
    assert document["training"]["stop_reason"] == "target_reached"


@pytest.mark.parametrize("seed", [2026, 90210])
def test_dates_translates_fresh_dates_in_every_locale_and_format(seed: int) -> None:
    entry = ENTRIES["dates"]
    inputs = acceptance_set("dates", seed, training_seed=entry.training_seed, data_options=entry.data_options)
    assert len(set(inputs.groups)) == 134 and len(inputs.pairs) == 134 * 15
    result = check(shipped("dates"), inputs)
    assert result.exact_match >= entry.bar, result.to_dict()


def test_dates_beam_search_translates_fresh_dates() -> None:
    entry = ENTRIES["dates"]
    inputs = acceptance_set("dates", 4242, training_seed=entry.training_seed, data_options=entry.data_options)
    result = check(shipped("dates"), inputs, beam_size=4)
    assert result.exact_match >= entry.bar, result.to_dict()


@pytest.mark.parametrize("beam_size", [0, 4])
def test_numbers_translates_every_number_of_its_range_in_both_languages(beam_size: int) -> None:
    entry = ENTRIES["numbers"]
    inputs = acceptance_set("numbers", 0, training_seed=entry.training_seed, data_options=entry.data_options)
    assert len(inputs.pairs) == 2000 and sorted(set(inputs.groups)) == ["de", "fr"]
    result = check(shipped("numbers"), inputs, beam_size=beam_size)
    assert result.exact_match >= entry.bar, result.to_dict()

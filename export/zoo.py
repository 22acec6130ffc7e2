"""The default model repository that ``make models`` builds and ``make serve`` loads.

Each entry is a complete, deterministic recipe. A built version records the recipe's fingerprint in its
``model.json``; rebuilding is skipped while a version with the same fingerprint exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from service.runtime.repository import discover

# Bump when a change to training or export code should rebuild the default models.
ZOO_REVISION = 1


@dataclass(frozen=True)
class ZooEntry:
    name: str
    task: str
    model: dict
    description: str
    training: dict = field(default_factory=dict)
    bar: float = 0.99            # test exact match the entry must reach

    def fingerprint(self) -> str:
        payload = json.dumps({"revision": ZOO_REVISION, "task": self.task, "model": self.model,
                              "training": self.training}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEFAULT_MODELS = (
    ZooEntry(
        name="dates",
        task="dates",
        description="Dates written in 20+ locales -> ISO 8601; additive (Bahdanau) attention, GRU.",
        model={"attention": "additive", "style": "bahdanau", "encoder": "gru", "decoder": "gru",
               "embedding": 64, "hidden": 128, "top_k": 16},
        training={"batch_size": 128, "learning_rate": 3e-3, "eval_every": 200, "target_exact_match": 0.998,
                  "max_minutes": 6.0, "patience": 10},
        bar=0.995,
    ),
    ZooEntry(
        name="numbers",
        task="numbers",
        description="German and French number words (0-999) -> English; general attention, Luong style with "
                    "input feeding. Word order swaps (vierundachtzig -> eighty-four).",
        model={"attention": "general", "style": "luong", "encoder": "gru", "decoder": "gru",
               "embedding": 64, "hidden": 128, "top_k": 16, "dropout": 0.25},
        # Split by number, 10% each for valid and test: the test numbers were never seen in either language.
        training={"batch_size": 64, "learning_rate": 3e-3, "eval_every": 100, "target_exact_match": 0.995,
                  "max_minutes": 12.0, "patience": 12, "lr_patience": 2,
                  "data_options": {"max_number": 999, "valid_fraction": 0.1, "test_fraction": 0.1}},
        bar=0.99,
    ),
)


def is_up_to_date(repository: Path, entry: ZooEntry) -> bool:
    """True when some version of ``entry.name`` was built from the same recipe."""
    versions = discover(repository).get(entry.name, [])
    for version in versions:
        try:
            document = json.loads((Path(repository) / entry.name / str(version) / "model.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if document.get("build", {}).get("fingerprint") == entry.fingerprint():
            return True
    return False

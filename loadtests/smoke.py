"""Tiny trained models for smoke runs (CI's Locust smoke, `attnserve bench --quick`) and the tests, built once.

python -m loadtests.smoke            # -> build/smoke/models (repository) and build/smoke/runs (runs)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from loadtests.servers import PROJECT_ROOT

SMOKE_ROOT = PROJECT_ROOT / "build" / "smoke"

SMOKE_MODELS: dict[str, dict[str, Any]] = {
    # Small enough to train in seconds on two cores; the smoke test needs real graphs, not accuracy.
    # Its limits are fixed here (not derived from the data), since the bad-input tests probe them exactly.
    "dates": dict(
        task="dates",
        data={"n_train": 3000, "n_valid": 200, "n_test": 200, "max_source_chars": 48},
        model={
            "attention": "additive",
            "style": "bahdanau",
            "hidden": 32,
            "embedding": 16,
            "top_k": 8,
            "max_source_len": 50,
            "max_target_len": 16,
        },
    ),
    # An LSTM decoder, Luong style: its step carries three state tensors (hidden, cell, feed), which the
    # tests use to check that the server gathers state it knows nothing about.
    "numbers": dict(
        task="numbers",
        data={"max_number": 999},
        model={"attention": "general", "style": "luong", "decoder": "lstm", "hidden": 32, "embedding": 16, "top_k": 8},
    ),
}


def build_smoke_repository(root: Path, steps: int = 150, log=print) -> Path:
    """Tiny trained `dates` and `numbers` models in `root/models` (training runs in `root/runs`), built once."""
    from export.onnx_export import export_run
    from export.train import TrainConfig, train
    from service.runtime.repository import discover

    repository = root / "models"
    present = discover(repository)
    for name, spec in SMOKE_MODELS.items():
        if present.get(name) and (root / "runs" / name / "best.pt").is_file():
            continue
        shutil.rmtree(repository / name, ignore_errors=True)
        log(f"building the smoke model {name} ({steps} steps)")
        config = TrainConfig(
            task=spec["task"],
            out=root / "runs" / name,
            max_steps=steps,
            eval_every=steps,
            batch_size=64,
            learning_rate=5e-3,
            data_options=spec["data"],
            model=spec["model"],
            valid_limit=100,
        )
        train(config, progress=False)
        export_run(root / "runs" / name, repository, name, progress=lambda *_: None)
    return repository


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0]) if argv else SMOKE_ROOT
    print(build_smoke_repository(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Shared fixtures: tiny but really trained models, exported to a real model repository once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

# Small enough to train in seconds on two cores; they learn the easy part of each task, which is all the
# serving tests need (real graphs, real tokenizers, outputs that depend on the input).
TINY_MODELS = {
    "dates": dict(task="dates", data={"n_train": 3000, "n_valid": 200, "n_test": 200},
                  model={"attention": "additive", "style": "bahdanau", "hidden": 32, "embedding": 16, "top_k": 8}),
    "numbers": dict(task="numbers", data={"max_number": 999},
                    model={"attention": "general", "style": "luong", "decoder": "lstm", "hidden": 32,
                           "embedding": 16, "top_k": 8}),
}


def build_tiny_repository(root: Path, names: tuple[str, ...] = ("dates", "numbers"), steps: int = 150) -> Path:
    from export.onnx_export import export_run
    from export.train import TrainConfig, train

    repository = root / "models"
    for name in names:
        spec = TINY_MODELS[name]
        config = TrainConfig(task=spec["task"], out=root / "runs" / name, max_steps=steps, eval_every=steps,
                             batch_size=64, learning_rate=5e-3, data_options=spec["data"], model=spec["model"],
                             valid_limit=100)
        train(config, progress=False)
        export_run(root / "runs" / name, repository, name, progress=lambda *_: None)
    return repository


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with tiny trained ``dates`` and ``numbers`` models (version 1 each)."""
    return build_tiny_repository(tmp_path_factory.mktemp("tiny"))

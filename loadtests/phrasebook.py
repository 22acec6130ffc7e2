"""The benchmark's own models, built once and cached: `phrasebook` (production size) and `near-free`.

The default models (`dates`, `numbers`) are so small that the RPC path bounds them. The benchmark also needs
a model whose cost is arithmetic, with the shape of a real translation model: hidden size 512, a
SentencePiece vocabulary of about 8000 pieces per side, trained on a user-style TSV corpus. This module
makes one end to end, offline, with the project's own user-facing commands:

1. `python -m loadtests.corpus` writes the phrasebook corpus (see loadtests/corpus.py);
2. the trainer behind `attnserve train --task tsv:CORPUS ...` trains it for a few minutes (accuracy is not
   the point: the cost per token is the same for a trained and an untrained model of this shape); it runs
   with 1% validation and test splits so that evaluation and the export's parity check take seconds;
3. `attnserve export` writes it into the benchmark's model repository.

The result is cached under the cache folder with the recipe's fingerprint; while the fingerprint matches,
re-running the benchmark reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

MODEL_NAME = "phrasebook"

# Bump when the corpus generator or the recipe changes in a way that should retrain.
RECIPE_REVISION = 1


@dataclass(frozen=True)
class PhrasebookRecipe:
    """How the phrasebook model is built: `train_steps` optimizer steps (the same model on every machine),
    with `train_minutes` as a safety bound on the training loop (evaluation and export add under a minute)."""

    corpus_lines: int = 40000
    max_clauses: int = 3
    seed: int = 13
    hidden: int = 512
    embedding: int = 256
    attention: str = "additive"
    vocab_size: int = 8000
    batch_size: int = 32
    learning_rate: float = 3e-3
    train_steps: int = 80
    train_minutes: float = 8.0
    threads: int = 2
    top_k: int = 16
    eval_fraction: float = 0.01
    eval_pairs: int = 300

    def fingerprint(self) -> str:
        payload = json.dumps({"revision": RECIPE_REVISION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def train_config(self, corpus: Path, run_dir: Path) -> dict:
        """The TrainConfig fields of this recipe (what `attnserve train --task tsv:CORPUS ...` sets, plus the
        small validation and test splits that keep evaluation and export parity checks to seconds)."""
        return {
            "task": f"tsv:{corpus}",
            "out": str(run_dir),
            "seed": self.seed,
            "tokenizer": "sentencepiece",
            "vocab_size": self.vocab_size,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "max_steps": self.train_steps,
            "max_minutes": self.train_minutes,
            "eval_every": 1_000_000,
            "patience": 1000,
            "valid_limit": self.eval_pairs,
            "threads": self.threads,
            "data_options": {"valid_fraction": self.eval_fraction, "test_fraction": self.eval_fraction},
            "model": {
                "attention": self.attention,
                "style": "bahdanau",
                "encoder": "gru",
                "decoder": "gru",
                "hidden": self.hidden,
                "embedding": self.embedding,
                "top_k": self.top_k,
            },
        }


@dataclass(frozen=True)
class PhrasebookModel:
    """A built phrasebook model: its version folder in the repository, its training run and its corpus."""

    version_dir: Path
    run_dir: Path
    corpus: Path
    built_now: bool


def _attnserve(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *arguments]


def _build_cached(
    name: str,
    recipe: PhrasebookRecipe | NearFreeRecipe,
    cache_dir: Path,
    repository: Path,
    prepare: Callable[[Path], dict],
    log: Callable[[str], None],
) -> PhrasebookModel:
    """`repository/NAME/1` built from `recipe` into `cache_dir/NAME/` unless a build of the same recipe is
    there: `prepare(work)` writes what training needs and returns the TrainConfig fields; then train (in a
    process of its own) and export. Raises RuntimeError when a step fails."""
    work = Path(cache_dir) / name
    run_dir, version_dir, stamp = work / "run", Path(repository) / name / "1", work / "recipe.json"
    fingerprint = recipe.fingerprint()
    if _built(stamp, version_dir, run_dir, fingerprint):
        return PhrasebookModel(version_dir, run_dir, work / "corpus.tsv", built_now=False)
    started = time.monotonic()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(Path(repository) / name, ignore_errors=True)
    work.mkdir(parents=True)
    settings = prepare(work)
    _run([sys.executable, "-m", "loadtests.phrasebook", "train", json.dumps(settings)], work / "train.log")
    log(f"{name}: exporting")
    _run(
        _attnserve("export", str(run_dir), "--repository", str(repository), "--name", name, "--version", "1"),
        work / "export.log",
    )
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "recipe": asdict(recipe)}, indent=2) + "\n")
    log(f"{name}: built in {time.monotonic() - started:.0f} s")
    return PhrasebookModel(version_dir, run_dir, work / "corpus.tsv", built_now=True)


def ensure_phrasebook(
    cache_dir: Path, repository: Path, recipe: PhrasebookRecipe | None = None, *, log=print
) -> PhrasebookModel:
    """The phrasebook model in `repository/phrasebook/1`, built into `cache_dir/phrasebook/` unless a
    build of the same recipe is already there. Raises RuntimeError when a build step fails."""
    from loadtests.corpus import phrase_pairs, write_corpus

    chosen = recipe or PhrasebookRecipe()

    def prepare(work: Path) -> dict:
        log(f"phrasebook: generating a {chosen.corpus_lines}-line corpus")
        corpus = work / "corpus.tsv"
        write_corpus(corpus, phrase_pairs(chosen.corpus_lines, seed=chosen.seed, max_clauses=chosen.max_clauses))
        log(
            f"phrasebook: training {chosen.train_steps} steps (at most {chosen.train_minutes:g} min; hidden "
            f"{chosen.hidden}, vocabulary {chosen.vocab_size}, {chosen.threads} threads)"
        )
        return chosen.train_config(corpus, work / "run")

    return _build_cached(MODEL_NAME, chosen, cache_dir, repository, prepare, log)


NEAR_FREE_NAME = "near-free"


@dataclass(frozen=True)
class NearFreeRecipe:
    """The `near-free` model: the dates task at hidden size 16 for a few hundred steps. Its calls cost
    almost nothing (what a GPU makes of the default models), so serving it measures the server itself:
    the engine's loop and the RPC path. Accuracy is not the point (it translates some dates)."""

    hidden: int = 16
    embedding: int = 8
    train_steps: int = 300
    seed: int = 13

    def fingerprint(self) -> str:
        payload = json.dumps({"revision": RECIPE_REVISION, "name": NEAR_FREE_NAME, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def train_config(self, run_dir: Path) -> dict:
        return {
            "task": "dates",
            "out": str(run_dir),
            "seed": self.seed,
            "max_steps": self.train_steps,
            "eval_every": 1_000_000,
            "patience": 1000,
            "valid_limit": 200,
            "data_options": {"n_train": 20_000, "n_valid": 200, "n_test": 200},
            "model": {"hidden": self.hidden, "embedding": self.embedding, "top_k": 8},
        }


def ensure_near_free(
    cache_dir: Path, repository: Path, recipe: NearFreeRecipe | None = None, *, log=print
) -> PhrasebookModel:
    """The near-free model in `repository/near-free/1`, built into `cache_dir/near-free/` unless a build of
    the same recipe is there (about a minute on 2 cores)."""
    chosen = recipe or NearFreeRecipe()

    def prepare(work: Path) -> dict:
        log(f"near-free: training {chosen.train_steps} steps of the dates task at hidden size {chosen.hidden}")
        return chosen.train_config(work / "run")

    return _build_cached(NEAR_FREE_NAME, chosen, cache_dir, repository, prepare, log)


def _built(stamp: Path, version_dir: Path, run_dir: Path, fingerprint: str) -> bool:
    try:
        recorded = json.loads(stamp.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return False
    return recorded == fingerprint and (version_dir / "model.json").is_file() and (run_dir / "best.pt").is_file()


def _run(command: list[str], log_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    with log_path.open("w") as log_file:
        completed = subprocess.run(command, cwd=root, stdout=log_file, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(command[2:5])} failed with status {completed.returncode}:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtests.phrasebook train CONFIG_JSON`: train one run (used by ensure_phrasebook, in a
    process of its own so torch's threads leave with it); `python -m loadtests.phrasebook build`: build."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and len(argv) == 2:
        from export.train import TrainConfig, train

        settings = json.loads(argv[1])
        settings["out"] = Path(settings["out"])
        summary = train(TrainConfig(**settings), progress=False)
        print(
            json.dumps(
                {
                    "test": summary["metrics"]["test"],
                    "training": {k: v for k, v in summary["training"].items() if k != "history"},
                },
                indent=2,
            )
        )
        return 0
    if argv[:1] == ["build"]:
        cache = Path(argv[1]) if len(argv) > 1 else Path("build/bench")
        model = ensure_phrasebook(cache, cache / "repository")
        print(model.version_dir)
        return 0
    print("usage: python -m loadtests.phrasebook build [CACHE_DIR] | train CONFIG_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

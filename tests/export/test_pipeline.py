"""Train -> export -> onnxruntime decode, end to end on tiny real models, plus the CLI's error paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx_export import ort_greedy
from export.train import (
    CORPUS_SOURCE_NORMALIZATION,
    CORPUS_TARGET_NORMALIZATION,
    TrainConfig,
    load_checkpoint,
    normalizations,
    train,
)
from service.runtime.model import load_model
from service.runtime.normalization import IDENTITY, LEGACY
from service.runtime.repository import discover
from service.runtime.tokenizers import EOS

pytestmark = pytest.mark.slow  # trains models or starts servers


def test_repository_versions_carry_the_contract(tiny_repository: Path) -> None:
    assert discover(tiny_repository) == {"dates": [1], "numbers": [1]}
    for name in ("dates", "numbers"):
        document = json.loads((tiny_repository / name / "1" / "model.json").read_text())
        assert document["parity"]["greedy_identical"] is True
        assert document["parity"]["max_abs_log_prob"] <= 1e-4
        assert document["parity"]["max_abs_attention"] <= 1e-4
        assert 0.0 <= document["metrics"]["test"]["exact_match"] <= 1.0
        assert {"bleu", "chrf"} <= set(document["metrics"]["test"])
        assert "TopK" in document["onnx"]["op_types"]["decoder"]
        assert document["limits"]["top_k"] >= 1
    numbers = json.loads((tiny_repository / "numbers" / "1" / "model.json").read_text())
    # Luong style with an LSTM decoder: the state the server must carry has three named tensors.
    assert [s["input"] for s in numbers["decoder"]["state"]] == ["state_hidden", "state_cell", "state_feed"]


def test_onnxruntime_decodes_as_the_checkpoint_does(tiny_repository: Path) -> None:
    loaded = load_model(tiny_repository / "numbers" / "1", provider="cpu")
    assert loaded.provider == "CPUExecutionProvider"
    model, _ = load_checkpoint(tiny_repository.parent / "runs" / "numbers" / "best.pt")
    texts = ["vierundachtzig", "quatre-vingt-dix-sept", "dreihundertzwölf", "zéro"]
    sources = [loaded.source_tokenizer.encode(t) + [EOS] for t in texts]
    ort_out = ort_greedy(loaded.step_model, sources, model.config.max_target_len)
    for source, expected in zip(sources, ort_out, strict=False):
        torch_out, _ = model.greedy(torch.tensor([source]), torch.tensor([len(source)]))
        assert torch_out[0] == expected
    loaded.warm_up()


def test_training_is_deterministic_and_resumes(tmp_path: Path) -> None:
    def run(out: Path, steps: int, resume: bool = False) -> dict:
        config = TrainConfig(
            task="numbers",
            out=out,
            max_steps=steps,
            eval_every=10,
            batch_size=32,
            data_options={"max_number": 99},
            valid_limit=20,
            model={"hidden": 16, "embedding": 8, "attention": "dot"},
        )
        return train(config, resume=resume, progress=False)

    first, second = run(tmp_path / "a", 20), run(tmp_path / "b", 20)
    weights_a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    weights_b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert first["training"]["history"] == [
        {**h, "seconds": first["training"]["history"][i]["seconds"]}
        for i, h in enumerate(second["training"]["history"])
    ]
    resumed = run(tmp_path / "a", 30, resume=True)
    assert resumed["training"]["steps"] == 30
    assert [h["step"] for h in resumed["training"]["history"]] == [10, 20, 30]


def attnserve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_malformed_corpus_is_reported_with_its_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("hello\tbonjour\nno tab on this line\nbye\tau revoir\n", encoding="utf-8")
    result = attnserve(
        "train", "--task", f"tsv:{corpus}", "--out", str(tmp_path / "run"), "--quiet", cwd=Path(__file__).parents[2]
    )
    assert result.returncode == 2
    assert ":2:" in result.stderr and "tab" in result.stderr.lower()


def test_unknown_options_are_refused(tmp_path: Path) -> None:
    root = Path(__file__).parents[2]
    result = attnserve("train", "--task", "dates", "--out", str(tmp_path), "--attention", "bilinear", cwd=root)
    assert result.returncode == 2 and "invalid choice: 'bilinear'" in result.stderr
    result = attnserve("train", "--task", "poems", "--out", str(tmp_path), "--quiet", cwd=root)
    assert result.returncode == 2 and "unknown task 'poems'" in result.stderr
    result = attnserve("frobnicate", cwd=root)
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr


def test_user_corpus_trains_with_sentencepiece_and_exports(tmp_path: Path) -> None:
    from export.onnx_export import export_run

    rng = np.random.default_rng(0)
    words = {"cat": "chat", "dog": "chien", "house": "maison", "red": "rouge", "small": "petit", "big": "grand"}
    lines = []
    for _ in range(400):
        chosen = rng.choice(list(words), size=int(rng.integers(1, 4)))
        lines.append(" ".join(chosen) + "\t" + " ".join(words[w] for w in chosen))
    corpus = tmp_path / "pairs.tsv"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = TrainConfig(
        task=f"tsv:{corpus}",
        out=tmp_path / "run",
        max_steps=20,
        eval_every=20,
        batch_size=32,
        vocab_size=40,
        model={"hidden": 16, "embedding": 8},
    )
    summary = train(config, progress=False)
    assert summary["tokenizer"] == "sentencepiece"
    result = export_run(tmp_path / "run", tmp_path / "models", "toy", progress=lambda *_: None)
    assert result.document.tokenizers.source.type == "sentencepiece"
    assert load_model(result.directory, provider="cpu").source_tokenizer.vocab_size <= 40


def test_a_user_corpus_gets_the_declared_normalisation_by_default(tmp_path: Path) -> None:
    from export.onnx_export import export_run

    # A corpus as people paste it: no-break spaces, full-width digits, a byte order mark, doubled spaces.
    lines = [f"\ufeffroom\u00a0{number}\tsalle  {number}" for number in range(150)]
    lines += [f"room {number}\tsalle {number}" for number in range(150, 300)]
    lines += [f"ｒｏｏｍ {chr(0xFF10 + number % 10)}\tsalle {number % 10}" for number in range(300, 310)]
    corpus = tmp_path / "rooms.tsv"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = TrainConfig(
        task=f"tsv:{corpus}",
        tokenizer="char",
        out=tmp_path / "run",
        max_steps=10,
        eval_every=10,
        batch_size=32,
        model={"hidden": 16, "embedding": 8},
    )
    summary = train(config, progress=False)
    assert summary["normalization"] == {
        "source": CORPUS_SOURCE_NORMALIZATION.to_document(),
        "target": CORPUS_TARGET_NORMALIZATION.to_document(),
    }
    result = export_run(tmp_path / "run", tmp_path / "models", "rooms", progress=lambda *_: None)
    assert result.document.tokenizers.source.normalization == CORPUS_SOURCE_NORMALIZATION
    served = load_model(result.directory, provider="cpu")
    source = served.source_tokenizer
    # The server tokenizes what people send as it tokenized the training sources.
    assert source.encode("\ufeffroom\u00a042 ") == source.encode("room 42") == source.encode("ｒｏｏｍ ４２")
    assert "\u00a0" not in source.vocabulary and "\ufeff" not in source.vocabulary
    assert served.target_tokenizer.normalize("salle  42 ") == "salle 42"


def test_the_normalisation_of_a_run_is_the_configurations_then_the_tasks_then_the_kinds(tmp_path: Path) -> None:
    from export.data import Splits, make_numbers
    from export.data.numbers import NUMBERS_NORMALIZATION

    corpus = Splits(train=[], valid=[], test=[])
    for kind in ("char", "word"):
        config = TrainConfig(task="tsv:x.tsv", out=tmp_path, tokenizer=kind)
        assert normalizations(config, corpus, kind) == (CORPUS_SOURCE_NORMALIZATION, CORPUS_TARGET_NORMALIZATION)
    config = TrainConfig(task="tsv:x.tsv", out=tmp_path, tokenizer="sentencepiece")
    assert normalizations(config, corpus, "sentencepiece") == (IDENTITY, IDENTITY)
    numbers = make_numbers(max_number=20)
    assert normalizations(TrainConfig(task="numbers", out=tmp_path), numbers, "char") == (NUMBERS_NORMALIZATION, LEGACY)
    chosen = TrainConfig(task="numbers", out=tmp_path, source_normalization="nfc", target_normalization="none")
    assert normalizations(chosen, numbers, "char") == (LEGACY, IDENTITY)


def test_int8_export_records_the_accuracy_change_and_serves(tiny_repository: Path, tmp_path: Path) -> None:
    from export.onnx_export import export_run

    result = export_run(
        tiny_repository.parent / "runs" / "dates",
        tmp_path / "models",
        "dates",
        quantize="int8",
        progress=lambda *_: None,
    )
    quantization = result.document.quantization
    assert {"test_exact_match_fp32", "test_exact_match_int8", "change"} <= set(quantization)
    assert quantization["change"] == pytest.approx(
        quantization["test_exact_match_int8"] - quantization["test_exact_match_fp32"], abs=1e-5
    )
    # Quantized graphs use integer matrix products, and still load and decode through the same runtime.
    ops = set(result.document.onnx["op_types"]["decoder"])
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    loaded = load_model(result.directory, provider="cpu")
    [decoded] = ort_greedy(loaded.step_model, [loaded.source_tokenizer.encode("1 mars 1909") + [EOS]], 12)
    assert all(0 <= token < loaded.target_tokenizer.vocab_size for token in decoded)

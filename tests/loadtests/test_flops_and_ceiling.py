"""FLOP counting from onnxruntime profiles, the matrix-multiply peak, and the engine ceiling, on real tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from export.onnx_export import ort_greedy
from loadtests.ceiling import CeilingPoint, interpolate_ceiling, measure_ceiling, tokenize_sources
from loadtests.flops import ModelFlops, measure_matmul_peak, measure_model_flops, node_flops
from loadtests.workload import task_texts
from service.runtime.model import load_model

pytestmark = pytest.mark.slow  # trains models or starts servers


@pytest.fixture(scope="module")
def dates_model(tiny_repository: Path):
    model = load_model(tiny_repository / "dates" / "1", provider="cpu", intra_op_threads=1)
    model.warm_up()
    return model


def test_node_flops_from_profiled_shapes() -> None:
    # [3, 5] x [5, 7]: 2 * 3 * 7 * 5
    assert node_flops("MatMul", [[3, 5]], [[3, 7]]) == 210
    assert node_flops("Gemm", [[2, 8]], [[2, 4]]) == 2 * 2 * 4 * 8
    # A batched product [b, m, k] x [b, k, n]
    assert node_flops("MatMul", [[4, 1, 6], [4, 6, 9]], [[4, 1, 9]]) == 2 * 4 * 9 * 6
    # GRU: X [seq 5, batch 2, input 3], Y [5, 2 directions, 2, hidden 4]:
    # 2 * 3 gates * 4 * (3 + 4) per step/row/direction
    assert node_flops("GRU", [[5, 2, 3]], [[5, 2, 2, 4]]) == 2 * 5 * 2 * 2 * 3 * 4 * (3 + 4)
    assert node_flops("Tanh", [[3, 5]], [[3, 5]]) == 0
    assert node_flops("MatMul", [], [[1]]) == 0


def test_profiled_flops_match_the_architecture(dates_model) -> None:
    """The tiny dates model (additive attention, Bahdanau GRU) counted by hand from its dimensions."""
    arch = dates_model.document.architecture
    hidden, embedding, vocab = arch["hidden"], arch["embedding"], arch["target_vocab"]
    assert (arch["attention"], arch["style"], arch["encoder"], arch["decoder"]) == (
        "additive",
        "bahdanau",
        "gru",
        "gru",
    )
    for source in (4, 11):
        flops = measure_model_flops(dates_model, source)
        half = hidden // 2
        encoder = (
            2 * 2 * source * 3 * half * (embedding + half)  # two GRU directions
            + 2 * hidden * hidden  # bridge
            + 2 * 2 * source * hidden * hidden
        )  # memory projection and attention keys
        step = (
            2
            * (
                hidden * hidden  # attention query projection
                + 3 * hidden * (embedding + hidden)
                + 3 * hidden * hidden  # GRU cell
                + hidden * (2 * hidden + embedding)  # readout
                + hidden * vocab
            )  # output layer
            + 2 * 2 * source * hidden
        )  # attention energies and context
        assert flops == ModelFlops(source, float(encoder), float(step))


def test_flops_per_generated_token_amortises_the_encoder() -> None:
    flops = ModelFlops(source_tokens=10, encoder_flops=1000.0, step_flops=50.0)
    assert flops.per_generated_token(10) == 50.0 + 100.0
    assert flops.per_generated_token(10, beam_size=4) == 200.0 + 100.0


def test_matmul_peak_is_measured() -> None:
    peak = measure_matmul_peak(threads=1, sizes=(128,), seconds=0.05)
    assert peak.size == 128 and peak.threads == 1 and peak.provider == "CPUExecutionProvider"
    assert 1e8 < peak.flops_per_s < 1e13


def test_ceiling_decodes_what_onnx_greedy_decodes(dates_model) -> None:
    sources = tokenize_sources(dates_model, task_texts("dates", 12, seed=1))
    assert sources and all(ids[-1] == 2 for ids in sources)
    expected = ort_greedy(
        dates_model.step_model, [ids.tolist() for ids in sources], dates_model.document.limits.max_target_tokens
    )
    # The ceiling counts generated tokens with eos (when the row stopped by itself), like the server does.
    limit = dates_model.document.limits.max_target_tokens
    lengths = [min(len(tokens) + 1, limit) for tokens in expected]
    point = measure_ceiling(dates_model, sources, 12, min_seconds=0.0)
    assert point.batch == 12 and point.rows == 12 and point.waves == 1
    assert point.mean_tokens == pytest.approx(np.mean(lengths))
    assert point.mean_source_tokens == pytest.approx(np.mean([len(ids) for ids in sources]))
    assert point.tokens_per_s == pytest.approx(
        12 * point.mean_tokens / (point.encode_s + point.mean_tokens * point.step_s)
    )


def test_ceiling_with_beam_rows(dates_model) -> None:
    sources = tokenize_sources(dates_model, task_texts("dates", 8, seed=2))
    point = measure_ceiling(dates_model, sources, 2, beam_size=4, min_seconds=0.0, max_waves=2)
    assert point.rows == 8 and point.batch == 2
    assert point.requests_per_s == pytest.approx(point.tokens_per_s / point.mean_tokens)


def test_interpolate_ceiling_in_log_rows() -> None:
    def point(rows: int, tokens_per_s: float) -> CeilingPoint:
        return CeilingPoint(rows, rows, tokens_per_s, 0, 0, 0, 0, 1, 1, 1)

    points = [point(1, 100.0), point(4, 300.0), point(16, 500.0)]
    assert interpolate_ceiling(points, 2) == pytest.approx(200.0)
    assert interpolate_ceiling(points, 8) == pytest.approx(400.0)
    assert interpolate_ceiling(points, 0.5) == 100.0 and interpolate_ceiling(points, 64) == 500.0
    assert math.isnan(interpolate_ceiling(points, math.nan))

"""Model FLOPs per generated token, and the machine's measured matrix-multiply peak: the roofline.

FLOPs are counted from what onnxruntime really runs, not from the architecture: the encoder and one decoder
step are run once with onnxruntime's profiler on, and every matrix product in the profile (MatMul, Gemm,
and the recurrent GRU/LSTM/RNN operators) is counted from the shapes it actually saw, at 2 FLOPs per
multiply-add. Element-wise work (activations, softmax, top-k) is left out: it is small next to the matrix
products, and the peak it is compared with is a matrix-multiply peak.

The peak is measured, not looked up: a float32 MatMul graph run by onnxruntime on the same provider and
with the same intra-op thread count as the server.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.runtime.model import LoadedModel, choose_providers, with_provider_options
from service.runtime.tokenizers import BOS, EOS, UNK


@dataclass(frozen=True)
class ModelFlops:
    """Matrix-multiply FLOPs of one model version for a source of `source_tokens` tokens (eos included).

    `encoder_flops`: one encoder call for one source; `step_flops`: one decoder step for one row.
    """

    source_tokens: int
    encoder_flops: float
    step_flops: float

    def per_generated_token(self, generated_tokens: float, beam_size: int = 1) -> float:
        """FLOPs per token delivered to the client: every beam row's step, plus the encoder amortised over
        the request's `generated_tokens`."""
        generated = max(generated_tokens, 1.0)
        return beam_size * self.step_flops + self.encoder_flops / generated


def count_profile_flops(profile: list[dict]) -> float:
    """Matrix-multiply FLOPs of the node events of one onnxruntime profile (a list of trace events)."""
    total = 0.0
    for event in profile:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        inputs = [_shape(entry) for entry in args.get("input_type_shape", [])]
        outputs = [_shape(entry) for entry in args.get("output_type_shape", [])]
        total += node_flops(args.get("op_name", ""), inputs, outputs)
    return total


def _shape(entry: dict) -> list[int]:
    # Each entry is {"float": [dims]}: one key, the element type.
    return [int(dim) for dim in next(iter(entry.values()), [])] if entry else []


_GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    """FLOPs of one matrix-product node from the shapes onnxruntime profiled.

    The profile lists only the inputs that are not constant weights, so the count is made from the output
    and the first (activation) input: a product [..., M, K] x [K, N] -> [..., M, N] is 2*M*N*K per leading
    index; a recurrent node with input X [seq, batch, I] and output Y [seq, directions, batch, H] does
    2 * gates*H * (I + H) per step, batch row and direction. Other operators count 0.
    """
    if not inputs or not outputs or not inputs[0] or not outputs[0]:
        return 0.0
    if op in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"):
        return 2.0 * math.prod(outputs[0]) * inputs[0][-1]
    if op in _GATES and len(inputs[0]) == 3 and len(outputs[0]) == 4:
        sequence, batch, features = inputs[0]
        _, directions, _, hidden = outputs[0]
        return 2.0 * sequence * batch * directions * _GATES[op] * hidden * (features + hidden)
    return 0.0


def _profiled_session(path: Path, provider: str, threads: int, prefix: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=with_provider_options(choose_providers(provider)))


def _profile_events(session, feeds: dict, outputs: list[str] | None = None) -> tuple[list, list[dict]]:
    # Run twice and keep only the last run's node events: the first run includes one-off work.
    session.run(outputs, feeds)
    results = session.run(outputs, feeds)
    profile_path = session.end_profiling()
    try:
        events = json.loads(Path(profile_path).read_text())
    finally:
        os.unlink(profile_path)
    runs = [index for index, event in enumerate(events) if event.get("name") == "model_run"]
    if len(runs) >= 2:
        # Node events of a run precede its model_run event; keep those between the two runs' markers.
        events = events[runs[-2] + 1 : runs[-1]]
    return results, events


def measure_model_flops(model: LoadedModel, source_tokens: int, provider: str = "cpu", threads: int = 1) -> ModelFlops:
    """Profile one encoder call (one source of `source_tokens` tokens) and one decoder step (one row)."""
    document = model.document
    step_graph = document.decoder
    source_tokens = max(1, min(source_tokens, document.limits.max_source_tokens))
    ids = np.full((1, source_tokens), UNK, dtype=np.int64)
    ids[0, -1] = EOS
    lengths = np.array([source_tokens], dtype=np.int64)
    with tempfile.TemporaryDirectory() as folder:
        prefix = str(Path(folder) / "profile")
        encoder = _profiled_session(model.directory / document.encoder.file, provider, threads, prefix + "-encoder")
        names = list(step_graph.memory) + [state.init for state in step_graph.state]
        encoded, encoder_events = _profile_events(encoder, {"source_ids": ids, "source_lengths": lengths}, names)
        memory = dict(zip(step_graph.memory, encoded[: len(step_graph.memory)], strict=False))
        state = {
            spec.input: value for spec, value in zip(step_graph.state, encoded[len(step_graph.memory) :], strict=False)
        }
        decoder = _profiled_session(model.directory / step_graph.file, provider, threads, prefix + "-decoder")
        feeds = {"tokens": np.array([BOS], dtype=np.int64), "source_lengths": lengths, **memory, **state}
        _, decoder_events = _profile_events(decoder, feeds)
    return ModelFlops(
        source_tokens=source_tokens,
        encoder_flops=count_profile_flops(encoder_events),
        step_flops=count_profile_flops(decoder_events),
    )


@dataclass(frozen=True)
class MatmulPeak:
    """The best float32 matrix-multiply rate measured: `flops_per_s` at size n x n x n, `threads` intra-op
    threads, on `provider`."""

    flops_per_s: float
    size: int
    threads: int
    provider: str


def measure_matmul_peak(
    threads: int = 1,
    provider: str = "cpu",
    sizes: tuple[int, ...] | None = None,
    seconds: float = 1.0,
    *,
    tf32: bool = False,
) -> MatmulPeak:
    """The best sgemm rate onnxruntime reaches here: a MatMul graph of n x n by n x n (float32), run
    repeatedly for about `seconds` per size; the fastest run counts (the least disturbed by other load).
    `tf32`: on CUDA, with TF32 matrix multiplies (what `--cuda-tf32` allows); float32 otherwise.
    On CUDA the operands stay on the device (IO binding), so no host copy is timed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    providers = choose_providers(provider)
    on_gpu = providers[0] == "CUDAExecutionProvider"
    sizes = sizes or ((2048, 4096) if on_gpu else (512, 1024))
    best = MatmulPeak(0.0, 0, threads, provider)
    for size in sizes:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "sgemm",
            [
                helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, [size, size]),
            ],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
        )
        onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx_model.ir_version = 8
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(
            onnx_model.SerializeToString(), options, providers=with_provider_options(providers, tf32=tf32)
        )
        rng = np.random.default_rng(0)
        feeds = {
            "a": rng.standard_normal((size, size), dtype=np.float32),
            "b": rng.standard_normal((size, size), dtype=np.float32),
        }
        if session.get_providers()[0] == "CUDAExecutionProvider":
            binding = session.io_binding()
            for name, value in feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            binding.bind_output("c", "cuda")

            def run_once(session: Any = session, binding: Any = binding) -> None:
                session.run_with_iobinding(binding)
        else:

            def run_once(session: Any = session, binding: Any = feeds) -> None:  # binding: the feeds here
                session.run(None, binding)

        run_once()
        fastest = math.inf
        deadline = time.perf_counter() + seconds
        runs = 0
        while runs < 3 or time.perf_counter() < deadline:
            started = time.perf_counter()
            run_once()
            fastest = min(fastest, time.perf_counter() - started)
            runs += 1
        rate = 2.0 * size**3 / fastest
        if rate > best.flops_per_s:
            best = MatmulPeak(rate, size, threads, session.get_providers()[0])
    return best

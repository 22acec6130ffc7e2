"""Load one model version from the repository into onnxruntime and expose it as the engine's step model.

Nothing here knows the architecture: the memory and state tensor names come from ``model.json``
(see docs/model-format.md), and every tensor has the batch on its first axis.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ModelLoadError
from service.runtime.model_format import ModelDocument
from service.runtime.providers import PROVIDERS
from service.runtime.step import EncoderOutput, StepOutput
from service.runtime.tokenizers import BOS, EOS, UNK, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def choose_providers(provider: str) -> list[str]:
    """The onnxruntime providers to ask for, for a setting of 'auto', 'cpu' or 'cuda'.

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU, so the list says what may
    work, not what will: the session that is created reports the provider that really runs.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is not one of {PROVIDERS}")
    if provider == "cpu" or "CUDAExecutionProvider" not in ort.get_available_providers():
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


LARGE_DECODER_BYTES = 16 * 2**20
"""A decoder graph of this size or more (about 4M float32 weights, e.g. hidden 512 over an 8,000-piece
vocabulary) has operators large enough that more than one onnxruntime thread shortens a step; below it, a
second thread costs more in hand-offs than it saves."""


@dataclass(frozen=True)
class RuntimeThreads:
    """How onnxruntime runs one model version's sessions on the CPU.

    `intra_op`: threads inside one operator (1 = the calling thread alone, no pool); `spinning`: whether the
    pool's threads spin between runs; `chosen`: True when the server chose `intra_op` (setting 0);
    `encoder_overlap`: whether the engine runs the encoder for requests joining a running batch on a thread of
    its own, beside the decoder step (see choose_threads)."""

    intra_op: int
    inter_op: int
    spinning: bool
    chosen: bool
    encoder_overlap: bool = False

    def describe(self) -> str:
        how = "chosen for the model" if self.chosen else "as set"
        return (
            f"{self.intra_op} intra-op thread{'s' if self.intra_op != 1 else ''} ({how}), spinning "
            + ("on" if self.spinning else "off")
            + (", the encoder beside the decoder step" if self.encoder_overlap else "")
        )


ONE_THREAD = RuntimeThreads(intra_op=1, inter_op=1, spinning=False, chosen=False)
"""What a step model made directly (export's parity checks, tools) runs with: one thread, no pool."""


def usable_cpus() -> int:
    """CPUs this process may use: its CPU affinity, lowered by a cgroup v2 CPU limit (cpu.max) if one is set."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here, or a file we do not understand
        pass
    return cpus


def choose_threads(
    intra_op_threads: int,
    inter_op_threads: int,
    spinning: bool,
    *,
    on_gpu: bool,
    decoder_bytes: int,
    cpus: int,
    encoder_overlap: str = "auto",
) -> RuntimeThreads:
    """The onnxruntime threads for a model version. `intra_op_threads` 0 lets the server choose: 1 on a GPU (the
    device does the work) and for models whose decoder graph is under LARGE_DECODER_BYTES; for larger models
    half the usable `cpus` (at most 4), leaving the rest to the RPC work. onnxruntime's own default (a thread
    per core, spinning between runs) is never used: the engine calls Run every few hundred microseconds, so
    such a pool never sleeps and burns a core the RPC path needs.

    `encoder_overlap` ("auto", "on", "off"): "auto" runs the encoder beside the decoder step on the CPU for a
    model of LARGE_DECODER_BYTES or more when the usable `cpus` hold both sessions' threads. Such a model's
    encoder call for the requests that join costs a fifth of a step or more (the phrasebook model: 1.3 ms beside
    a 5.4 ms step of 64 rows), time the batch otherwise waits. A small model's encoder call costs less than the
    thread hop, and on a GPU both calls share one device. With the chosen threads (half the CPUs) the condition
    holds on every machine of 2 CPUs or more, and during a step the two sessions may use all of them; it was
    measured with 1 + 1 threads on 2 cores."""
    intra_op = intra_op_threads
    if intra_op <= 0:
        intra_op = 1 if on_gpu or decoder_bytes < LARGE_DECODER_BYTES else max(1, min(4, cpus // 2))
    if encoder_overlap == "auto":
        overlap = not on_gpu and decoder_bytes >= LARGE_DECODER_BYTES and cpus >= 2 * intra_op
    else:
        overlap = encoder_overlap == "on"
    return RuntimeThreads(intra_op, inter_op_threads, spinning, chosen=intra_op_threads <= 0, encoder_overlap=overlap)


def with_provider_options(providers: list[str], *, tf32: bool = False) -> list[str | tuple[str, dict[str, str]]]:
    """`providers` as onnxruntime's InferenceSession takes them, each with the options this runtime sets.

    CUDA: TF32 off unless `tf32`. onnxruntime's CUDA provider uses TF32 by default on Ampere and later GPUs: it
    rounds float32 matrix-multiply inputs to 10 bits of mantissa, which moved the default models' step log
    probabilities far from the CPU's for little speed (docs/gpu.md, "Precision")."""
    return [
        (name, {"use_tf32": "1" if tf32 else "0"}) if name == "CUDAExecutionProvider" else name for name in providers
    ]


def _create_session(ort: Any, path: Path, options: Any, providers: list[str], tf32: bool = False) -> Any:
    """Create a session; without a usable GPU, the CUDA provider's failure is expected, so keep it quiet."""
    if providers[0] == "CPUExecutionProvider":
        return ort.InferenceSession(str(path), options, providers=providers)
    ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(str(path), options, providers=with_provider_options(providers, tf32=tf32))
    finally:
        ort.set_default_logger_severity(3)


def _bare_run(session: Any) -> Callable[[list[str], dict[str, np.ndarray], Any], list[np.ndarray]]:
    """`session.run` without the Python wrapper's checks: the session's C++ `run`, called as run(output names,
    feeds, run options or None). The wrapper checks the feed's names against the graph, the ownership of OrtValue
    inputs and WebGPU graph capture at every call, about 3 us, 12 times in a short request (its encoder and 11
    decoder steps). The engine feeds numpy arrays under names checked once at load (`_check_signatures`). The
    wrapper's other duty, falling back to the CPU provider when a CUDA provider fails, is one this runtime does not
    want: it names its provider, and a failed run fails the requests of that step. The public `run` where a build
    of onnxruntime lacks the C++ session."""
    run: Callable[[list[str], dict[str, np.ndarray], Any], list[np.ndarray]] | None = getattr(
        getattr(session, "_sess", None), "run", None
    )
    return run if run is not None else session.run


class OnnxStepModel:
    """The engine's ``StepModel`` on two onnxruntime sessions (encoder, one decoder step).

    With IO binding (on by default with the CUDA provider) the decoder's memory tensors, the largest inputs
    of a step ([rows, source_len, hidden] each), are copied to the device once per memory version (the engine
    bumps it when a request joins or leaves) and reused by every step until then; only the small per-row
    tensors (tokens, lengths, state) travel each step.
    """

    def __init__(
        self,
        document: ModelDocument,
        directory: Path,
        *,
        providers: list[str],
        threads: RuntimeThreads = ONE_THREAD,
        require_cuda: bool = False,
        io_binding: bool | None = None,
        tf32: bool = False,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.threads = threads
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads.intra_op
        options.inter_op_num_threads = threads.inter_op
        spin = "1" if threads.spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        decoder = document.decoder
        self.top_k = document.limits.top_k
        self.eos_id = EOS
        self.bos_id = BOS
        self.memory_names = decoder.memory
        self.state_names = tuple(s.input for s in decoder.state)
        try:
            self._encoder = _create_session(ort, directory / document.encoder.file, options, providers, tf32)
            self._decoder = _create_session(ort, directory / decoder.file, options, providers, tf32)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt or missing graphs
            raise ModelLoadError(f"{directory}: cannot load ONNX graphs: {exc}") from exc
        self._run_encoder = _bare_run(self._encoder)
        self._run_decoder = _bare_run(self._decoder)
        self.provider = self._decoder.get_providers()[0]
        if require_cuda and self.provider != "CUDAExecutionProvider":
            raise ModelLoadError(f"{directory}: provider 'cuda' was asked for but onnxruntime runs on {self.provider}")
        self._init_names = [s.init for s in decoder.state]
        self._encoder_outputs = list(decoder.memory) + self._init_names
        self._decoder_outputs = ["topk_log_probs", "topk_ids", "attention"] + [s.output for s in decoder.state]
        self._check_signatures()
        on_gpu = self.provider == "CUDAExecutionProvider"
        self.io_binding = on_gpu if io_binding is None else io_binding
        self._device = "cuda" if on_gpu else "cpu"
        # The version of the memory last uploaded (see StepModel.step) and its device copies.
        self._memory_version = -1
        self._device_memory: dict[str, Any] = {}
        self.memory_uploads = 0
        # Run options for the next encoder and decoder run: None, or once after shrink_arenas_at_next_run() the
        # options that have the session's CPU arena free its unused chunks when the run ends.
        self._shrink_options = ort.RunOptions()
        self._shrink_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._encoder_run_options: Any = None
        self._decoder_run_options: Any = None
        self.arena_shrinks = 0  # runs that shrank their session's arena

    def _check_signatures(self) -> None:
        encoder_in = {i.name for i in self._encoder.get_inputs()}
        encoder_out = {o.name for o in self._encoder.get_outputs()}
        decoder_in = {i.name for i in self._decoder.get_inputs()}
        decoder_out = {o.name for o in self._decoder.get_outputs()}
        wanted = [
            ("encoder inputs", {"source_ids", "source_lengths"} - encoder_in),
            ("encoder outputs", set(self._encoder_outputs) - encoder_out),
            (
                "decoder inputs",
                ({"tokens", "source_lengths"} | set(self.memory_names) | set(self.state_names)) - decoder_in,
            ),
            ("decoder outputs", set(self._decoder_outputs) - decoder_out),
        ]
        for what, missing in wanted:
            if missing:
                raise ModelLoadError(f"model.json names {what} the graph lacks: {sorted(missing)}")

    def shrink_arenas_at_next_run(self) -> None:
        """Have the next encoder run and the next decoder run each free the chunks of its session's CPU arena that
        nothing uses when it ends (service/runtime/memory.py says why). Any thread: the flags are read and cleared
        by the threads that run the sessions; a request that races one is merely late."""
        self._encoder_run_options = self._decoder_run_options = self._shrink_options

    def encode(self, source_ids: np.ndarray, source_lengths: np.ndarray) -> EncoderOutput:
        run_options = self._encoder_run_options
        if run_options is not None:
            self._encoder_run_options = None
            self.arena_shrinks += 1
        outputs = self._run_encoder(
            self._encoder_outputs, {"source_ids": source_ids, "source_lengths": source_lengths}, run_options
        )
        n_memory = len(self.memory_names)
        memory = dict(zip(self.memory_names, outputs[:n_memory], strict=False))
        state = dict(zip(self.state_names, outputs[n_memory:], strict=False))
        return EncoderOutput(memory=memory, state=state)

    def step(
        self,
        tokens: np.ndarray,
        source_lengths: np.ndarray,
        memory: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        *,
        memory_version: int = -1,
    ) -> StepOutput:
        if self.io_binding:
            outputs = self._step_with_binding(tokens, source_lengths, memory, state, memory_version)
        else:
            feeds = {"tokens": tokens, "source_lengths": source_lengths, **memory, **state}
            run_options = self._decoder_run_options
            if run_options is not None:
                self._decoder_run_options = None
                self.arena_shrinks += 1
            outputs = self._run_decoder(self._decoder_outputs, feeds, run_options)
        new_state = dict(zip(self.state_names, outputs[3:], strict=False))
        return StepOutput(topk_log_probs=outputs[0], topk_ids=outputs[1], attention=outputs[2], state=new_state)

    def _step_with_binding(
        self,
        tokens: np.ndarray,
        source_lengths: np.ndarray,
        memory: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        memory_version: int,
    ) -> list[np.ndarray]:
        if memory_version < 0 or memory_version != self._memory_version:
            self._device_memory = {
                name: self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device, 0)
                for name, array in memory.items()
            }
            self._memory_version = memory_version
            self.memory_uploads += 1
        binding = self._decoder.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens))
        binding.bind_cpu_input("source_lengths", np.ascontiguousarray(source_lengths))
        for name, value in self._device_memory.items():
            binding.bind_ortvalue_input(name, value)
        for name, array in state.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._decoder_outputs:
            binding.bind_output(name, "cpu")
        self._decoder.run_with_iobinding(binding)
        outputs: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return outputs


@dataclass
class LoadedModel:
    """A model version ready to serve: its model.json, tokenizers and step model."""

    document: ModelDocument
    directory: Path
    source_tokenizer: Tokenizer
    target_tokenizer: Tokenizer
    step_model: OnnxStepModel
    load_seconds: float = 0.0

    @property
    def provider(self) -> str:
        return str(self.step_model.provider)

    @property
    def threads(self) -> RuntimeThreads:
        return self.step_model.threads

    def warm_up(self) -> None:
        """Run the encoder and a few decoder steps at two shapes so the first real request is not slow."""
        for batch, length in ((1, 4), (4, min(16, self.document.limits.max_source_tokens))):
            ids = np.full((batch, length), UNK, dtype=np.int64)
            ids[:, -1] = EOS
            lengths = np.full((batch,), length, dtype=np.int64)
            encoded = self.step_model.encode(ids, lengths)
            tokens = np.full((batch,), BOS, dtype=np.int64)
            state = encoded.state
            for _ in range(2):
                out = self.step_model.step(tokens, lengths, encoded.memory, state)
                tokens, state = out.topk_ids[:, 0].astype(np.int64), out.state


def read_text_side(directory: Path) -> tuple[ModelDocument, Tokenizer, Tokenizer]:
    """A version's model.json and its (source, target) tokenizers, checked against each other: what a process
    that tokenizes but never decodes needs. Raises ModelLoadError with the cause."""
    document = ModelDocument.read(directory)
    tokenizers = document.tokenizers
    try:
        source = load_tokenizer(tokenizers.source.type, directory / tokenizers.source.file)
        target = load_tokenizer(tokenizers.target.type, directory / tokenizers.target.file)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{directory}: cannot load tokenizers: {exc}") from exc
    for side, tok in (("source", source), ("target", target)):
        expected = document.architecture.get(f"{side}_vocab")
        if expected is not None and int(expected) != tok.vocab_size:
            raise ModelLoadError(
                f"{directory}: {side} tokenizer has {tok.vocab_size} tokens but the model was trained with {expected}"
            )
    for side, tok, declared in (
        ("source", source, tokenizers.source.normalization),
        ("target", target, tokenizers.target.normalization),
    ):
        if declared is not None and declared != tok.normalization:
            raise ModelLoadError(
                f"{directory}: model.json says the {side} tokenizer normalises with {declared.describe()}, but its "
                f"file declares {tok.normalization.describe()}"
            )
    return document, source, target


def load_model(
    directory: Path,
    *,
    provider: str = "auto",
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    spinning: bool = False,
    cpus: int | None = None,
    io_binding: bool | None = None,
    encoder_overlap: str = "auto",
    tf32: bool = False,
) -> LoadedModel:
    """Load the model version in ``directory`` (``models/NAME/VERSION``); raises ModelLoadError with the cause.

    Threads: see choose_threads (`intra_op_threads` 0 = chosen for the model; `cpus` usable, default the CPU
    affinity's)."""
    started = time.monotonic()
    directory = Path(directory)
    document, source, target = read_text_side(directory)
    providers = choose_providers(provider)
    try:
        decoder_bytes = (directory / document.decoder.file).stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"{directory}: cannot read {document.decoder.file}: {exc}") from exc
    threads = choose_threads(
        intra_op_threads,
        inter_op_threads,
        spinning,
        on_gpu=providers[0] == "CUDAExecutionProvider",
        decoder_bytes=decoder_bytes,
        cpus=cpus if cpus is not None else usable_cpus(),
        encoder_overlap=encoder_overlap,
    )
    step_model = OnnxStepModel(
        document,
        directory,
        providers=providers,
        threads=threads,
        require_cuda=provider == "cuda",
        io_binding=io_binding,
        tf32=tf32,
    )
    return LoadedModel(
        document=document,
        directory=directory,
        source_tokenizer=source,
        target_tokenizer=target,
        step_model=step_model,
        load_seconds=time.monotonic() - started,
    )

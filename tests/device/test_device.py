"""What matters on an accelerator, on the shipped default models: the provider really runs, IO binding,
the engine decoding exactly as on the CPU, and a gRPC round trip.

The provider comes from ATTNSERVE_TEST_PROVIDER (default `cpu`); the GPU check (`make gpu-check`) runs this
module with `cuda`. Nothing here trains or needs torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from service.engine import DecodeOptions, EngineCore, EngineRequest
from service.runtime.model import load_model
from service.runtime.repository import discover
from service.runtime.tokenizers import EOS
from service.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = PROJECT_ROOT / "models"
PROVIDER = os.environ.get("ATTNSERVE_TEST_PROVIDER", "cpu")
EXPECTED_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[PROVIDER]


def newest_version(repository: Path, name: str) -> Path:
    """The newest version of model `name`: what a server with the default settings serves."""
    return repository / name / str(max(discover(repository)[name]))


INPUTS = json.loads((PROJECT_ROOT / "loadtests" / "data" / "default_model_inputs.json").read_text(encoding="utf-8"))


def decode(
    step_model, tokenizer, texts: list[str], beam: int = 1, memory_versions: list[int] | None = None
) -> list[list[int]]:
    """Every text decoded together by one engine core over `step_model` (its first hypothesis' tokens); the
    memory version of each decoder step is appended to `memory_versions` when given."""
    limits = Settings(max_active_hypotheses=1024, max_padded_source_tokens=1 << 20).engine_limits()
    core = EngineCore(step_model, limits)
    options = DecodeOptions(beam_size=beam, num_hypotheses=1, max_length=40)
    for key, text in enumerate(texts):
        source = np.array(tokenizer.encode(text) + [EOS], dtype=np.int64)
        core.add(key, EngineRequest(source, options, deadline=None, stream=False, arrival=0.0), 0.0)
    results: dict[int, list[int]] = {}
    while core.has_work:
        output = core.step()
        assert not output.failed, output.failed
        if memory_versions is not None and output.stats is not None and output.stats.rows:
            memory_versions.append(output.stats.memory_generation)
        results.update({done.key: done.result.hypotheses[0].token_ids for done in output.finished})
    return [results[key] for key in range(len(texts))]


@pytest.mark.parametrize("name", ["dates", "numbers"])
def test_the_session_runs_on_the_requested_provider_and_decodes_correctly(name: str) -> None:
    if PROVIDER == "cuda":
        import onnxruntime

        onnxruntime.preload_dlls()
    model = load_model(newest_version(REPOSITORY, name), provider=PROVIDER, intra_op_threads=1)
    assert model.provider == EXPECTED_PROVIDER
    pairs = INPUTS[name]
    outputs = decode(model.step_model, model.source_tokenizer, [source for source, _ in pairs])
    texts = [model.target_tokenizer.decode(tokens) for tokens in outputs]
    correct = sum(text == reference for text, (_, reference) in zip(texts, pairs, strict=False))
    assert correct >= 0.99 * len(pairs), [(s, r, t) for (s, r), t in zip(pairs, texts, strict=False) if r != t][:5]


@pytest.mark.parametrize("name", ["dates", "numbers"])
def test_io_binding_and_batching_give_what_each_request_gets_alone_on_the_cpu(name: str) -> None:
    on_device = load_model(newest_version(REPOSITORY, name), provider=PROVIDER, intra_op_threads=1, io_binding=True)
    on_cpu = load_model(newest_version(REPOSITORY, name), provider="cpu", intra_op_threads=1)
    texts = [source for source, _ in INPUTS[name][:40]]
    versions: list[int] = []
    batched = decode(on_device.step_model, on_device.source_tokenizer, texts, beam=4, memory_versions=versions)
    alone = [decode(on_cpu.step_model, on_cpu.source_tokenizer, [text], beam=4)[0] for text in texts]
    assert batched == alone
    # Memory goes to the device once per memory version, not per step.
    changes = sum(1 for before, after in zip([None, *versions], versions, strict=False) if before != after)
    assert len(versions) > changes and on_device.step_model.memory_uploads == changes


def test_a_translate_call_through_a_real_server() -> None:
    import grpc

    from service.gen.attnserve.v1 import translator_pb2 as pb
    from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
    from tests.service.server_harness import ServerThread, make_settings

    running = ServerThread(make_settings(REPOSITORY, provider=PROVIDER)).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            texts = [source for source, _ in INPUTS["dates"][:16]]
            response = stub.Translate(pb.TranslateRequest(model="dates", texts=texts), timeout=60)
            got = [translation.hypotheses[0].text for translation in response.translations]
            assert got == [reference for _, reference in INPUTS["dates"][:16]]
            info = stub.GetModel(pb.GetModelRequest(name="dates"), timeout=10)
            assert info.provider == EXPECTED_PROVIDER
    finally:
        assert running.stop() == 0

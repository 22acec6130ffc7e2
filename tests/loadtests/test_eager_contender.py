"""The PyTorch eager contender: the checkpoint's own decode loop behind the same gRPC API."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from export.onnx_export import ort_greedy
from loadtests.eager_server import EagerModel, beam_one, greedy_one
from loadtests.servers import eager_server
from loadtests.workload import task_texts
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.runtime.model import load_model
from service.runtime.tokenizers import EOS

pytestmark = pytest.mark.slow  # trains models or starts servers


@pytest.fixture(scope="module")
def eager_dates(tiny_repository: Path) -> EagerModel:
    return EagerModel.load("dates", tiny_repository.parent / "runs" / "dates")


def test_eager_greedy_matches_the_exported_graphs(eager_dates: EagerModel, tiny_repository: Path) -> None:
    onnx_model = load_model(tiny_repository / "dates" / "1", provider="cpu", intra_op_threads=1)
    texts = task_texts("dates", 10, seed=5)
    sources = [eager_dates.source_ids(text) for text in texts]
    expected = ort_greedy(onnx_model.step_model, sources, onnx_model.document.limits.max_target_tokens)
    for ids, reference in zip(sources, expected, strict=False):
        tokens, ended = greedy_one(eager_dates.model, ids, eager_dates.max_length(0))
        assert tokens == reference
        assert ended == (len(tokens) < eager_dates.max_length(0))


def test_eager_beam_of_one_is_greedy_and_wider_beams_score_at_least_as_well(eager_dates: EagerModel) -> None:
    model = eager_dates.model
    for text in task_texts("dates", 6, seed=6):
        ids = eager_dates.source_ids(text)
        greedy, _ = greedy_one(model, ids, 16)
        single, _ = beam_one(model, ids, 1, 16)
        assert single == greedy
        wide, ended = beam_one(model, ids, 4, 16)
        assert EOS not in wide

        def log_prob(tokens: list[int], finished: bool, ids: list[int] = ids) -> float:
            source = torch.tensor([ids])
            target_in = torch.tensor([[1] + tokens])
            target_out = tokens + ([EOS] if finished else [])
            with torch.no_grad():
                log_probs = model(source, torch.tensor([len(ids)]), target_in)[0]
            return float(sum(log_probs[i, t] for i, t in enumerate(target_out)))

        greedy_ended = len(greedy) < 16
        if ended and greedy_ended:
            assert log_prob(wide, True) >= log_prob(greedy, True) - 1e-4


def test_eager_server_answers_over_grpc(tiny_repository: Path, tmp_path: Path) -> None:
    runs = {"dates": tiny_repository.parent / "runs" / "dates"}
    with eager_server(runs, threads=1, log_dir=tmp_path) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        texts = task_texts("dates", 3, seed=8)
        reply = stub.Translate(pb.TranslateRequest(model="dates", texts=texts), timeout=60)
        assert len(reply.translations) == 3
        best = reply.translations[0].hypotheses[0]
        assert best.source_tokens[-1] == "</s>" and best.target_tokens
        beam = stub.Translate(
            pb.TranslateRequest(model="dates", texts=texts[:1], options=pb.DecodeOptions(beam_size=4)), timeout=60
        )
        assert beam.translations[0].hypotheses[0].target_tokens
        with pytest.raises(grpc.RpcError) as error:
            stub.Translate(pb.TranslateRequest(model="nope", texts=["x"]), timeout=60)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

"""A REAL server with the encoder beside the decoder step turned on (`encoder_overlap=on`) for the tiny models,
which `auto` leaves off: calls that join a running batch are encoded on the encoder thread, and every call gets
what it gets alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.service.server_harness import ServerThread, make_settings, metric, scrape

pytestmark = pytest.mark.slow

TEXTS = [
    "samedi 21 novembre 2026",
    "3 mars 1999",
    "14 juillet 1789",
    "1 janvier 2000",
    "mardi 5 mai 2015",
    "31 décembre 1999",
    "2 février 2022",
    "VENDREDI 13 OCTOBRE 2023",
]


@pytest.fixture(scope="module")
def server_settings(tiny_repository: Path) -> Settings:
    return make_settings(tiny_repository, encoder_overlap="on")


@pytest.mark.parametrize("options", [{}, {"beam_size": 4, "num_hypotheses": 2}])
def test_calls_joining_a_running_batch_get_what_they_get_alone(stub: pb_grpc.TranslatorStub, options: dict) -> None:
    def request(texts: list[str]) -> pb.TranslateRequest:
        return pb.TranslateRequest(model="dates", texts=texts, options=pb.DecodeOptions(**options))

    alone = [stub.Translate(request([text]), timeout=60).translations[0] for text in TEXTS]
    # Sent together, most join a batch that is already decoding the first ones. The server runs in this process:
    # its encoder thread exists once a call was encoded beside a step (the pool starts it at its first call). Which
    # calls join a running batch is the server's timing, so bursts go on until one did (the first, in practice).
    for _ in range(5):
        futures = [stub.Translate.future(request([text]), timeout=60) for text in TEXTS * 3]
        for index, future in enumerate(futures):
            got, expected = future.result().translations[0], alone[index % len(TEXTS)]
            assert [h.text for h in got.hypotheses] == [h.text for h in expected.hypotheses]
            assert [h.score for h in got.hypotheses] == pytest.approx([h.score for h in expected.hypotheses], abs=1e-5)
        if any(thread.name.startswith("encoder dates") for thread in threading.enumerate()):
            break
    else:
        raise AssertionError("no call was encoded beside a decoder step")


def test_the_choice_is_exported_with_the_model(server: ServerThread, stub: pb_grpc.TranslatorStub) -> None:
    stub.Translate(pb.TranslateRequest(model="dates", texts=TEXTS[:1]), timeout=60)
    info = {"provider": "CPUExecutionProvider", "intra_op_threads": "1", "spinning": "false", "encoder_overlap": "true"}
    assert metric(scrape(server.metrics_url), "attnserve_model_info", model="dates", version="1", **info) == 1

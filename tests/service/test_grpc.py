"""The gRPC API against a REAL server on a free loopback port, with REAL tiny trained models.

`tiny_repository` (tests/conftest.py) trains and exports `dates` and `numbers` once per session.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from export.data.dates import DATES_NORMALIZATION
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.service.server_harness import (
    Samples,
    ServerThread,
    free_port,
    make_settings,
    metric,
    scrape,
    start_subprocess,
    wait_for,
    wait_until_serving,
)

pytestmark = pytest.mark.slow

DATES = ["samedi 21 novembre 2026", "3 mars 1999", "14 juillet 1789", "1 janvier 2000", "mardi 5 mai 2015"]
NUMBERS = ["quarante-deux", "dreihundert", "cent vingt-trois"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def translate(
    stub: pb_grpc.TranslatorStub, texts: list[str], model: str = "", **options: object
) -> pb.TranslateResponse:
    request = pb.TranslateRequest(model=model, texts=texts, options=pb.DecodeOptions(**options))
    return stub.Translate(request, timeout=30)


def status_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def attention_matrix(hypothesis: pb.Hypothesis) -> np.ndarray:
    return np.asarray(hypothesis.attention, dtype=np.float64).reshape(
        len(hypothesis.target_tokens), len(hypothesis.source_tokens)
    )


# ----- Translate ----------------------------------------------------------------------------------------


def test_translate_greedy(stub: pb_grpc.TranslatorStub) -> None:
    response = translate(stub, DATES[:2])
    assert (response.model, response.version) == ("dates", "1")  # empty model = the alphabetically first
    assert len(response.translations) == 2
    for source, translation in zip(DATES[:2], response.translations, strict=False):
        assert len(translation.hypotheses) == 1
        best = translation.hypotheses[0]
        assert best.score <= 0.0 and math.isfinite(best.score)
        # char tokenizers: the source pieces are the characters of the normalised text, then </s>
        assert list(best.source_tokens) == [*DATES_NORMALIZATION(source), "</s>"]
        generated = [token for token in best.target_tokens if token != "</s>"]
        assert best.text == "".join(generated)
        assert "</s>" not in best.target_tokens[:-1]
        assert len(best.attention) == 0  # not asked for
    # Different inputs are really decoded (not a constant answer)
    assert response.translations[0].hypotheses[0].text != response.translations[1].hypotheses[0].text


def test_beam_one_is_greedy(stub: pb_grpc.TranslatorStub) -> None:
    greedy = translate(stub, DATES)
    beam_one = translate(stub, DATES, beam_size=1)
    assert [t.hypotheses[0].text for t in greedy.translations] == [t.hypotheses[0].text for t in beam_one.translations]


def test_translate_beam_n_best(stub: pb_grpc.TranslatorStub) -> None:
    response = translate(stub, DATES[:3], beam_size=4, num_hypotheses=3)
    for translation in response.translations:
        hypotheses = translation.hypotheses
        assert len(hypotheses) == 3
        scores = [hypothesis.score for hypothesis in hypotheses]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(hypothesis.target_tokens) for hypothesis in hypotheses}) == 3  # distinct hypotheses
        assert all(hypothesis.text for hypothesis in hypotheses)


def test_attention_shape_and_rows(stub: pb_grpc.TranslatorStub) -> None:
    for options in ({}, {"beam_size": 3, "num_hypotheses": 2}):
        response = translate(stub, DATES[:2], return_attention=True, **options)
        for translation in response.translations:
            for hypothesis in translation.hypotheses:
                assert len(hypothesis.attention) == len(hypothesis.target_tokens) * len(hypothesis.source_tokens)
                matrix = attention_matrix(hypothesis)
                assert np.all(matrix >= 0.0)
                np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-4)


def test_other_model_by_name(stub: pb_grpc.TranslatorStub) -> None:
    response = translate(stub, NUMBERS, model="numbers", beam_size=2)
    assert (response.model, response.version) == ("numbers", "1")
    assert all(translation.hypotheses[0].text for translation in response.translations)
    pinned = stub.Translate(pb.TranslateRequest(model="numbers", version="1", texts=NUMBERS[:1]), timeout=30)
    assert pinned.version == "1"


def test_max_length_caps_output(stub: pb_grpc.TranslatorStub) -> None:
    response = translate(stub, DATES[:2], max_length=3)
    for translation in response.translations:
        assert len(translation.hypotheses[0].target_tokens) <= 3


# ----- TranslateStream ----------------------------------------------------------------------------------


def test_stream_greedy_equals_unary(stub: pb_grpc.TranslatorStub) -> None:
    for text in DATES[:3]:
        request = pb.TranslateRequest(texts=[text], options=pb.DecodeOptions(return_attention=True))
        messages = list(stub.TranslateStream(request, timeout=30))
        unary = stub.Translate(request, timeout=30).translations[0].hypotheses
        *tokens, final = messages
        assert final.final and not any(message.final for message in tokens)
        assert [message.index for message in tokens] == list(range(len(tokens)))
        assert final.index == len(tokens)
        assert "".join(message.token for message in tokens) == final.text == unary[0].text
        assert all(message.text == "".join(m.token for m in tokens[: i + 1]) for i, message in enumerate(tokens))
        assert (final.model, final.version) == ("dates", "1")
        assert len(final.hypotheses) == len(unary) == 1
        assert final.hypotheses[0].text == unary[0].text
        assert list(final.hypotheses[0].target_tokens) == list(unary[0].target_tokens)
        assert abs(final.hypotheses[0].score - unary[0].score) <= 1e-5
        np.testing.assert_allclose(final.hypotheses[0].attention, unary[0].attention, atol=1e-5)


def test_stream_beam_sends_one_final_message(stub: pb_grpc.TranslatorStub) -> None:
    request = pb.TranslateRequest(texts=[DATES[0]], options=pb.DecodeOptions(beam_size=4, num_hypotheses=2))
    messages = list(stub.TranslateStream(request, timeout=30))
    unary = stub.Translate(request, timeout=30).translations[0].hypotheses
    assert len(messages) == 1 and messages[0].final
    assert [h.text for h in messages[0].hypotheses] == [h.text for h in unary]
    assert [h.score for h in messages[0].hypotheses] == pytest.approx([h.score for h in unary], abs=1e-5)


def test_stream_takes_exactly_one_text(stub: pb_grpc.TranslatorStub) -> None:
    for texts in (DATES[:2], []):
        code, details = status_of(
            lambda texts=texts: list(stub.TranslateStream(pb.TranslateRequest(texts=texts), timeout=30))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "exactly one text" in details


# ----- models, health, reflection -----------------------------------------------------------------------


def test_list_models(stub: pb_grpc.TranslatorStub) -> None:
    response = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [model.name for model in response.models] == ["dates", "numbers"]
    assert response.default_model == "dates"
    dates, numbers = response.models
    assert (dates.attention, numbers.attention) == ("additive", "general")
    assert dates.is_default and not numbers.is_default
    for model in response.models:
        assert model.ready
        assert model.version == "1" and list(model.versions) == ["1"] and list(model.loaded_versions) == ["1"]
        assert model.provider == "CPUExecutionProvider"
        assert model.limits.top_k == 8 and model.limits.max_source_tokens > 0 and model.limits.max_target_tokens > 0
        assert 0.0 <= model.test_metrics["exact_match"] <= 1.0
        assert model.task.kind == model.name
        assert model.load_seconds > 0.0
    assert numbers.architecture["decoder"] == "lstm"


def test_get_model(stub: pb_grpc.TranslatorStub) -> None:
    numbers = stub.GetModel(pb.GetModelRequest(name="numbers"), timeout=10)
    assert (numbers.name, numbers.version, numbers.attention) == ("numbers", "1", "general")
    default = stub.GetModel(pb.GetModelRequest(), timeout=10)
    assert default.name == "dates" and default.is_default
    assert stub.GetModel(pb.GetModelRequest(name="dates", version="1"), timeout=10).version == "1"
    code, details = status_of(lambda: stub.GetModel(pb.GetModelRequest(name="dates", version="7"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "7" in details


def test_health_overall_and_per_model(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dates", "numbers", "attnserve.v1.Translator"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
    code, _ = status_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"attnserve.v1.Translator", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    translator = descriptor_pool.DescriptorPool(database).FindServiceByName("attnserve.v1.Translator")
    assert {method.name for method in translator.methods} == {"Translate", "TranslateStream", "ListModels", "GetModel"}


# ----- errors -------------------------------------------------------------------------------------------


def test_unknown_model_is_not_found(stub: pb_grpc.TranslatorStub) -> None:
    code, details = status_of(lambda: translate(stub, ["x"], model="klingon"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "klingon" in details and "dates" in details and "numbers" in details
    code, details = status_of(
        lambda: stub.Translate(pb.TranslateRequest(model="dates", version="3", texts=["x"]), timeout=10)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "version" in details


@pytest.mark.parametrize("name", ["../dates", "dates/../numbers", "/etc/passwd", "..", "a\\b", "x" * 65])
def test_path_like_model_names_are_refused(stub: pb_grpc.TranslatorStub, name: str) -> None:
    code, details = status_of(lambda: translate(stub, ["x"], model=name))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not valid" in details


@pytest.mark.parametrize(
    ("texts", "options", "message"),
    [
        (["x"], {"beam_size": 9}, "beam_size 9 exceeds the maximum 8"),
        (["x"], {"beam_size": 2, "num_hypotheses": 3}, "num_hypotheses 3 exceeds beam_size 2"),
        (["x"], {"num_hypotheses": 2}, "num_hypotheses 2 exceeds beam_size 1"),
        (["x"], {"max_length": 10_000}, "max_length 10000 exceeds the maximum"),
        (["x"], {"length_penalty": -0.5}, "length_penalty -0.5"),
        (["x"], {"length_penalty": float("nan")}, "length_penalty nan"),
        ([], {}, "texts is empty"),
        (["ok", ""], {}, "texts[1] is empty"),
        (["   \t"], {}, "texts[0] is empty or only whitespace"),
        (["1" * 500], {}, "source tokens (</s> included), more than the"),
        (["é" * 9000], {}, "texts[0] is 18000 bytes of UTF-8, the maximum is 16384"),
        (["x"] * 65, {}, "65 texts in one request, the maximum is 64"),
    ],
)
def test_bad_requests_are_invalid_argument(
    stub: pb_grpc.TranslatorStub, texts: list[str], options: dict, message: str
) -> None:
    code, details = status_of(lambda: translate(stub, texts, **options))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_one_bad_text_fails_the_whole_call(stub: pb_grpc.TranslatorStub) -> None:
    code, details = status_of(lambda: translate(stub, [DATES[0], "9" * 500]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "texts[1]" in details


# ----- batching -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"beam_size": 4, "num_hypotheses": 2}])
def test_batch_invariance(stub: pb_grpc.TranslatorStub, options: dict) -> None:
    texts = DATES + [text.upper() for text in DATES] + ["31 décembre 1999", "2 février 2022"]
    one_by_one = [translate(stub, [text], **options).translations[0] for text in texts]
    futures = [
        stub.Translate.future(pb.TranslateRequest(texts=[text], options=pb.DecodeOptions(**options)), timeout=60)
        for text in texts
    ]
    concurrent = [future.result().translations[0] for future in futures]
    together = translate(stub, texts, **options).translations
    for alone, parallel, batched in zip(one_by_one, concurrent, together, strict=False):
        for other in (parallel, batched):
            assert [h.text for h in other.hypotheses] == [h.text for h in alone.hypotheses]
            for mine, theirs in zip(alone.hypotheses, other.hypotheses, strict=False):
                assert abs(mine.score - theirs.score) <= 1e-5


# ----- metrics ------------------------------------------------------------------------------------------


def test_metrics_after_traffic(server: ServerThread, stub: pb_grpc.TranslatorStub) -> None:
    before = scrape(server.metrics_url)
    translate(stub, DATES[:3])
    translate(stub, NUMBERS[:2], model="numbers", beam_size=2)
    status_of(lambda: translate(stub, ["x"], beam_size=99))
    after = scrape(server.metrics_url)
    dates = {"model": "dates", "version": "1"}
    numbers = {"model": "numbers", "version": "1"}

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    grpc_translate = {"method": "Translate", "protocol": "grpc"}
    assert grew("attnserve_requests_total", code="OK", **grpc_translate, **dates) == 1
    assert grew("attnserve_requests_total", code="OK", **grpc_translate, **numbers) == 1
    assert grew("attnserve_requests_total", code="INVALID_ARGUMENT", **grpc_translate, **dates) == 1
    assert grew("attnserve_request_duration_seconds_count", **grpc_translate, **dates) == 2
    assert grew("attnserve_source_tokens_total", **dates) == sum(len(DATES_NORMALIZATION(t)) + 1 for t in DATES[:3])
    assert grew("attnserve_generated_tokens_total", **dates) >= 3
    assert grew("attnserve_queue_wait_seconds_count", **dates) == 3
    assert grew("attnserve_time_to_first_token_seconds_count", **numbers) == 2
    assert (
        grew("attnserve_finished_requests_total", reason="eos", **dates)
        + grew("attnserve_finished_requests_total", reason="length", **dates)
        == 3
    )
    assert grew("attnserve_decoder_batch_hypotheses_count", **dates) >= 1
    assert grew("attnserve_decoder_step_duration_seconds_count", **dates) >= 1
    assert grew("attnserve_encoder_batch_sources_sum", **dates) == 3
    assert metric(after, "attnserve_requests_waiting", **dates) == 0
    assert metric(after, "attnserve_requests_running", **dates) == 0
    info = {
        "provider": "CPUExecutionProvider",
        "intra_op_threads": "1",
        "spinning": "false",
        "encoder_overlap": "false",
    }
    assert metric(after, "attnserve_model_info", **info, **dates) == 1
    assert metric(after, "attnserve_model_load_seconds", **numbers) > 0
    durations = metric(after, "attnserve_decoder_step_duration_seconds_sum", **dates)
    assert 0 < durations < 60


# ----- cancellation and draining -------------------------------------------------------------------------


def test_cancelled_calls_cancel_their_engine_requests(tiny_repository: Path) -> None:
    # One request at a time, so a burst of calls queues up and cancelling them reaches the engine.
    running = ServerThread(make_settings(tiny_repository, batching="none")).start()
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            # 8 calls of 60 texts, decoded one text at a time: seconds of work even on a fast CPU.
            request = pb.TranslateRequest(texts=DATES * 12, options=pb.DecodeOptions(beam_size=8))
            labels = {"model": "dates", "version": "1"}
            texts = 8 * len(request.texts)

            def ended_in_all(samples: Samples) -> float:
                return sum(
                    metric(samples, "attnserve_finished_requests_total", reason=reason, **labels)
                    for reason in ("eos", "length", "cancelled")
                )

            def held(samples: Samples) -> float:  # texts in the engine: queued or decoding
                return sum(metric(samples, f"attnserve_requests_{where}", **labels) for where in ("waiting", "running"))

            def all_arrived_some_queued() -> bool:
                samples = scrape(running.metrics_url)  # one page per look, so the figures are of one moment
                return held(samples) + ended_in_all(samples) == texts and held(samples) > 1

            futures = [stub.Translate.future(request, timeout=120) for _ in range(8)]
            # All the texts reached the engine (held or already ended), and some are still queued.
            wait_for(all_arrived_some_queued, "every text to reach the engine")
            for future in futures:
                future.cancel()
            # Every one of them ends exactly once: finished before the cancellation reached it, or cancelled; and
            # the engine lets go of the cancelled ones at its next step.

            def all_ended() -> bool:
                samples = scrape(running.metrics_url)
                return ended_in_all(samples) == texts and held(samples) == 0

            wait_for(all_ended, "every text of the cancelled calls to end")
            samples = scrape(running.metrics_url)
            assert metric(samples, "attnserve_finished_requests_total", reason="cancelled", **labels) > 0
            assert held(samples) == 0
            assert metric(samples, "attnserve_requests_waiting", model="dates", version="1") == 0
            # The server still answers afterwards.
            assert translate(stub, DATES[:1]).translations[0].hypotheses[0].text
    finally:
        assert running.stop() == 0


def test_drain_reports_not_serving_and_refuses_new_calls(tiny_repository: Path) -> None:
    running = ServerThread(make_settings(tiny_repository, drain_grace_seconds=5.0)).start()
    with grpc.insecure_channel(running.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="dates"), timeout=30)
        assert next(watch).status == SERVING
        running.request_stop()
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        stub = pb_grpc.TranslatorStub(channel)
        code, _ = status_of(lambda: translate(stub, DATES[:1]))
        assert code == grpc.StatusCode.UNAVAILABLE
    assert running.stop() == 0


def test_sigterm_drains_in_flight_calls_and_exits_zero(tiny_repository: Path) -> None:
    port = free_port()
    process = start_subprocess(tiny_repository, port, "--batching", "none", "--drain-grace-seconds", "60")
    try:
        wait_until_serving(f"127.0.0.1:{port}", process=process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TranslatorStub(channel)
            request = pb.TranslateRequest(texts=DATES * 8, options=pb.DecodeOptions(beam_size=8, num_hypotheses=2))
            futures = [stub.Translate.future(request, timeout=120) for _ in range(6)]
            wait_for(lambda: any(future.done() for future in futures), "a first call to finish")  # all arrived
            in_flight = sum(not future.done() for future in futures)
            process.send_signal(signal.SIGTERM)
            results = [future.result() for future in futures]  # raises if any call failed
            assert in_flight > 0, "every call finished before SIGTERM; the test proves nothing"
            assert all(len(result.translations) == len(DATES) * 8 for result in results)
            assert all(t.hypotheses[0].text for result in results for t in result.translations)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read().decode("utf-8", "replace") if process.stdout else ""
    assert "draining" in output

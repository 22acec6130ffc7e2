"""Faults on a real server: a decoder step that raises inside onnxruntime, and calls whose deadline
passes while they are queued or decoding.

The failing model is a real export (the tiny `dates` model) whose decoder graph was rewritten so that a
step raises inside onnxruntime whenever a row's source has 20 tokens or more; shorter sources decode
exactly as before. Nothing in attnserve is replaced or patched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.runtime.tokenizers import load_tokenizer
from tests.reliability.reliability_support import (
    copy_version,
    make_decoder_fail_for_long_sources,
    metric,
    metric_sum,
    scrape,
    wait_for,
)
from tests.service.server_harness import ServerThread, make_settings

pytestmark = pytest.mark.slow

TRAP_TOKENS = 20  # sources of 20 tokens or more (</s> included) make the trapped decoder raise
GOOD = ["3 mars 1999", "1 janvier 2000", "5 mai 2015", "14 juillet 1789"]  # at most 15 tokens
# Tokens are counted after the dates model's normalisation, which drops spaces: 'samedi21novembre2026'.
POISON = ["samedi 21 novembre 2026", "mardi 5 mai 2015 à midi pile", "dimanche 14 juillet 1789"]  # 21+ tokens
TRAPPED = {"model": "trapped", "version": "1"}


@pytest.fixture(scope="module")
def repository(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dates` as exported, and `trapped`: the same model with the decoder trap."""
    root = tmp_path_factory.mktemp("faults") / "repository"
    shutil.copytree(tiny_repository / "dates", root / "dates")
    copy_version(
        tiny_repository / "dates" / "1",
        root,
        "trapped",
        1,
        prepare=lambda folder: make_decoder_fail_for_long_sources(folder, TRAP_TOKENS),
    )
    tokenizer = load_tokenizer("char", tiny_repository / "dates" / "1" / "source.tokenizer.json")
    assert all(len(tokenizer.encode(text)) + 1 < TRAP_TOKENS for text in GOOD)
    assert all(len(tokenizer.encode(text)) + 1 >= TRAP_TOKENS for text in POISON)
    return root


def call(stub: pb_grpc.TranslatorStub, texts: list[str], model: str, **options: object):  # type: ignore[no-untyped-def]
    request = pb.TranslateRequest(model=model, texts=texts, options=pb.DecodeOptions(**options))
    return stub.Translate.future(request, timeout=60)


def ending(future) -> tuple[str, str, pb.TranslateResponse | None]:  # type: ignore[no-untyped-def]
    try:
        return "OK", "", future.result()
    except grpc.RpcError as error:
        return error.code().name, error.details() or "", None


@pytest.mark.parametrize("batching", ["none", "continuous"])
def test_a_decoder_step_that_raises_fails_only_its_requests_and_the_server_goes_on(
    repository: Path, batching: str
) -> None:
    server = ServerThread(make_settings(repository, batching=batching)).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            # Alone: the poisoned request fails with INTERNAL and a message naming the failed step.
            code, details, _ = ending(call(stub, POISON[:1], "trapped"))
            assert code == "INTERNAL"
            assert details.startswith("the decoder step of model trapped version 1 failed: ")
            assert "Gather" in details and "out of data bounds" in details
            # Short sources on the same model decode exactly as the untouched model does.
            reference = {text: ending(call(stub, [text], "dates", beam_size=2))[2] for text in GOOD}
            for text in GOOD:
                code, _, response = ending(call(stub, [text], "trapped", beam_size=2))
                assert code == "OK" and response is not None
                expected = reference[text].translations[0].hypotheses[0]
                assert response.translations[0].hypotheses[0].text == expected.text
                assert response.translations[0].hypotheses[0].score == pytest.approx(expected.score, abs=1e-5)
            before = scrape(server.metrics_url)

            # A burst mixing good and poisoned calls, all in flight together.
            burst = [(text, call(stub, [text], "trapped", beam_size=2)) for text in (GOOD * 4 + POISON * 2)]
            endings = [(text, *ending(future)[:2]) for text, future in burst]

            # Every call was answered exactly once (futures resolve once), OK or INTERNAL, nothing else.
            assert {code for _, code, _ in endings} <= {"OK", "INTERNAL"}
            assert all(code == "INTERNAL" for text, code, _ in endings if text in POISON)
            # Only the poisoned requests fail. With batching=none each step holds one request; with
            # continuous batching good requests share steps with poisoned ones, and survive because a
            # failed step is run again for each request alone.
            assert [text for text, code, _ in endings if text in GOOD and code != "OK"] == []
            internal = sum(1 for _, code, _ in endings if code == "INTERNAL")
            assert internal == len(POISON) * 2
            # The server counts a call just after its answer leaves, so give the counters a moment.
            wait_for(
                lambda: (
                    metric_sum(scrape(server.metrics_url), "attnserve_requests_total", method="Translate", **TRAPPED)
                    - metric_sum(before, "attnserve_requests_total", method="Translate", **TRAPPED)
                    >= len(endings)
                ),
                what="the burst's calls to be counted",
            )
            after = scrape(server.metrics_url)

            def grew(name: str, **labels: str) -> float:
                return metric(after, name, **labels) - metric(before, name, **labels)

            grpc_translate = {"method": "Translate", "protocol": "grpc"}
            assert grew("attnserve_requests_total", code="INTERNAL", **grpc_translate, **TRAPPED) == internal
            assert grew("attnserve_requests_total", code="OK", **grpc_translate, **TRAPPED) == len(endings) - internal
            assert grew("attnserve_finished_requests_total", reason="error", **TRAPPED) == internal
            # Every engine request left the engine exactly once: finished (any reason) = texts sent.
            assert metric_sum(after, "attnserve_finished_requests_total", **TRAPPED) - metric_sum(
                before, "attnserve_finished_requests_total", **TRAPPED
            ) == len(endings)

            # The engine goes on: later requests decode, and the other model never noticed.
            for text in GOOD:
                assert ending(call(stub, [text], "trapped"))[0] == "OK"
            assert ending(call(stub, POISON[:1], "dates"))[0] == "OK"
            wait_for(
                lambda: metric(scrape(server.metrics_url), "attnserve_requests_running", **TRAPPED) == 0,
                what="the trapped model's batch to empty",
            )
    finally:
        assert server.stop() == 0


def test_one_poisoned_text_fails_its_whole_call_and_nothing_else(repository: Path) -> None:
    server = ServerThread(make_settings(repository, batching="none")).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            code, details, _ = ending(call(stub, [GOOD[0], POISON[0], GOOD[1]], "trapped"))
            assert code == "INTERNAL" and "decoder step" in details
            code, _, response = ending(call(stub, GOOD, "trapped"))
            assert code == "OK" and response is not None and len(response.translations) == len(GOOD)
            # The call's other texts were answered too (finished or cancelled), never left behind.
            wait_for(
                lambda: (
                    metric_sum(scrape(server.metrics_url), "attnserve_finished_requests_total", **TRAPPED)
                    >= 3 + len(GOOD)
                ),
                what="every text to leave the engine",
            )
            samples = scrape(server.metrics_url)
            assert metric_sum(samples, "attnserve_finished_requests_total", **TRAPPED) == 3 + len(GOOD)
            assert metric(samples, "attnserve_requests_waiting", **TRAPPED) == 0
    finally:
        assert server.stop() == 0


def test_expired_deadlines_leave_the_engine_and_free_their_slots(repository: Path) -> None:
    """Calls whose deadline passes while queued or decoding get DEADLINE_EXCEEDED; each of their texts
    leaves the engine exactly once (at its next step at the latest), and a call behind them runs."""
    # One beam-8 text fills the batch: every text waits for the ones before it.
    CALLS = 24  # noqa: N806
    settings = make_settings(repository, max_active_hypotheses=8, max_waiting_requests=4096)
    server = ServerThread(settings).start()
    dates = {"model": "dates", "version": "1"}
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            slow = pb.TranslateRequest(model="dates", texts=["1" * 40] * 64, options=pb.DecodeOptions(beam_size=8))
            # 1,536 texts decoded one at a time: seconds of work even where a text takes two quick steps (an idle
            # fast machine finished 384 of them within 0.3 s), so most calls expire. Which ones depends on the
            # machine, not on their order: when the first calls' deadlines pass their texts leave the queue, and a
            # fast engine may then finish a later call's 64 texts before its own deadline.
            doomed = [stub.Translate.future(slow, timeout=0.3) for _ in range(CALLS)]
            behind = call(stub, GOOD[:1], "dates")
            codes = [ending(future)[0] for future in doomed]
            assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"} and "DEADLINE_EXCEEDED" in codes
            code, _, response = ending(behind)
            assert code == "OK" and response is not None

            seen: list[tuple[float, float, float]] = []

            def settled() -> bool:
                samples = scrape(server.metrics_url)
                seen.append(
                    (
                        metric(samples, "attnserve_requests_waiting", **dates),
                        metric(samples, "attnserve_requests_running", **dates),
                        metric_sum(samples, "attnserve_finished_requests_total", **dates),
                    )
                )
                # Nothing left in the engine, on two looks in a row. A call whose deadline passed before its
                # handler ran never reaches the engine (a loaded machine leaves some in gRPC's backlog that long).
                return len(seen) >= 2 and seen[-1] == seen[-2] and seen[-1][:2] == (0, 0)

            try:
                wait_for(settled, what="every text of the expired calls to leave the engine")
            except AssertionError as timed_out:  # say where it stopped: (waiting, running, finished) at the end
                raise AssertionError(f"{timed_out}; (waiting, running, finished) last seen {seen[-3:]}") from None
            # Exactly once: a call's 64 texts enter together or not at all, and each that entered ended once.
            finished = int(seen[-1][2]) - 1  # the call behind them
            assert finished % 64 == 0 and 64 <= finished <= CALLS * 64, seen[-1]
            samples = scrape(server.metrics_url)
            gave_up = sum(
                metric(samples, "attnserve_finished_requests_total", reason=reason, **dates)
                for reason in ("cancelled", "deadline")
            )
            assert gave_up > 0  # most texts never ran: they left when their call's deadline passed
            assert metric(samples, "attnserve_finished_requests_total", reason="error", **dates) == 0
            assert ending(call(stub, GOOD, "dates"))[0] == "OK"
    finally:
        assert server.stop() == 0

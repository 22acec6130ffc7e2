"""The bad-input catalogue: each kind of bad request, sent to a real server with real tiny models, gets
the right status and a message that says what was wrong and the limit, and the server keeps serving.
Then a property-based test throws random Unicode texts and options at it.

Limits in force (the defaults): 64 texts per call, 16384 UTF-8 bytes per text, a 4 MiB request, beams
up to 8 (the tiny models' top_k); the tiny `dates` model takes 50 source tokens and makes 16.
"""

from __future__ import annotations

import math
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from export.data.dates import DATES_NORMALIZATION
from export.data.numbers import NUMBERS_NORMALIZATION
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.service.server_harness import make_settings

pytestmark = pytest.mark.slow

GOOD_TEXT = "3 mars 1999"


def normalized_length(text: str) -> int:
    """Characters of `text` once the tiny models normalise it (NFKC can write one character as several)."""
    return max(len(DATES_NORMALIZATION(text)), len(NUMBERS_NORMALIZATION(text)))


def shortest_normalized_length(text: str) -> int:
    """... and the fewer of the two (0: a model's normalisation leaves nothing, and the text is refused)."""
    return min(len(DATES_NORMALIZATION(text)), len(NUMBERS_NORMALIZATION(text)))


MAX_SOURCE_TOKENS = 50  # the tiny dates model's limits.max_source_tokens (</s> included)
MAX_TARGET_TOKENS = 16
WIDEST_BEAM = 8


@pytest.fixture(scope="module")
def layout(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(repository, decoy): the repository holds dates and numbers; beside it, OUTSIDE it, a decoy
    folder holds a perfectly loadable model that a path-traversing name would reach."""
    base = tmp_path_factory.mktemp("bad-input")
    repository = base / "repository"
    shutil.copytree(tiny_repository, repository)
    decoy = base / "outside"
    shutil.copytree(tiny_repository / "dates", decoy / "evil")
    return repository, decoy


@pytest.fixture(scope="module")
def server_settings(layout: tuple[Path, Path]) -> Settings:
    return make_settings(layout[0])


@pytest.fixture(autouse=True)
def still_serving(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every case: the server still translates a good request."""
    yield
    if "stub" in request.fixturenames:
        stub = request.getfixturevalue("stub")
        response = stub.Translate(pb.TranslateRequest(texts=[GOOD_TEXT]), timeout=30)
        assert response.translations[0].hypotheses[0].text


def translate(stub: pb_grpc.TranslatorStub, texts: list[str], model: str = "", version: str = "", **options: object):
    request = pb.TranslateRequest(model=model, version=version, texts=texts, options=pb.DecodeOptions(**options))
    return stub.Translate(request, timeout=30)


def refused(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details() or ""


# ----- texts ---------------------------------------------------------------------------------------------


def test_empty_texts(stub: pb_grpc.TranslatorStub) -> None:
    code, details = refused(lambda: translate(stub, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "texts is empty: send at least one text"


@pytest.mark.parametrize("text", ["", " ", "\t\n  ", "\u3000\u2003"])
def test_an_empty_or_whitespace_only_text(stub: pb_grpc.TranslatorStub, text: str) -> None:
    code, details = refused(lambda: translate(stub, [GOOD_TEXT, text]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "texts[1] is empty or only whitespace"


@pytest.mark.parametrize(
    ("model", "text"),
    [
        ("dates", "\u200f\u200e\ufeff"),  # bidi marks and a byte order mark
        ("dates", "\u200b\u00ad\u2060 \u200d"),  # zero-width characters, a soft hyphen, a word joiner
        ("numbers", "- \u2010\u2013"),  # dashes, which the numbers model drops
    ],
)
def test_a_text_the_models_normalisation_empties(stub: pb_grpc.TranslatorStub, model: str, text: str) -> None:
    code, details = refused(lambda: translate(stub, [GOOD_TEXT, text], model=model))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"texts[1] is empty once model {model} version 1 normalises it (NFKC; ignorables dropped")


def test_a_text_of_one_megabyte(stub: pb_grpc.TranslatorStub) -> None:
    code, details = refused(lambda: translate(stub, ["7" * (1 << 20)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "texts[0] is 1048576 bytes of UTF-8, the maximum is 16384"


def test_a_text_over_the_models_maximum_tokens(stub: pb_grpc.TranslatorStub) -> None:
    at_limit = "1" * (MAX_SOURCE_TOKENS - 1)  # + </s> = exactly the limit
    assert translate(stub, [at_limit]).translations[0].hypotheses
    code, details = refused(lambda: translate(stub, [at_limit + "1"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        f"texts[0] has {MAX_SOURCE_TOKENS + 1} source tokens (</s> included), more than the "
        f"{MAX_SOURCE_TOKENS} model dates version 1 accepts"
    )


def test_characters_the_tokenizer_has_never_seen(stub: pb_grpc.TranslatorStub) -> None:
    """Unknown characters are not an error: they become the unknown token and the text is translated."""
    text = "☃ 3 mars 1999 🦄ᚠᛇᚻ"
    best = translate(stub, [text], replace_unknowns=True).translations[0].hypotheses[0]
    assert best.source_tokens[0] == "<unk>" and list(best.source_tokens).count("<unk>") == 5
    assert len(best.source_tokens) == len(DATES_NORMALIZATION(text)) + 1  # the model drops spaces
    assert best.text and math.isfinite(best.score)


@pytest.mark.parametrize(
    "text",
    [
        "\x00\x01\x07 3 mars 1999\x1b[31m\x7f",  # NUL, bell, an ANSI escape, DEL
        "3 mars\u202e 1999\u200b\ufeff",  # right-to-left override, zero-width space, BOM
        "東京 3 mars 1999 Москва مرحبا",  # CJK, Cyrillic, Arabic in one text
        "3\u0301 ma\u0308rs 1999",  # combining marks
    ],
)
def test_control_characters_and_mixed_scripts(stub: pb_grpc.TranslatorStub, text: str) -> None:
    response = translate(stub, [text], beam_size=2, num_hypotheses=2, return_attention=True)
    hypotheses = response.translations[0].hypotheses
    assert len(hypotheses) == 2
    # One piece per character of the text as the dates model normalises it, then </s>.
    assert len(hypotheses[0].source_tokens) == len(DATES_NORMALIZATION(text)) + 1
    assert all(math.isfinite(hypothesis.score) for hypothesis in hypotheses)


def test_more_texts_than_the_per_call_maximum(stub: pb_grpc.TranslatorStub) -> None:
    assert len(translate(stub, [GOOD_TEXT] * 64).translations) == 64
    code, details = refused(lambda: translate(stub, [GOOD_TEXT] * 65))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "65 texts in one request, the maximum is 64"


# ----- decoding options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("beam_size", [0, 1])
def test_beam_size_zero_and_one_are_greedy(stub: pb_grpc.TranslatorStub, beam_size: int) -> None:
    greedy = translate(stub, [GOOD_TEXT]).translations[0].hypotheses
    beam = translate(stub, [GOOD_TEXT], beam_size=beam_size).translations[0].hypotheses
    assert [h.text for h in beam] == [h.text for h in greedy] and len(beam) == 1
    assert beam[0].score == pytest.approx(greedy[0].score, abs=1e-6)


def test_beam_size_at_the_maximum(stub: pb_grpc.TranslatorStub) -> None:
    hypotheses = (
        translate(stub, [GOOD_TEXT], beam_size=WIDEST_BEAM, num_hypotheses=WIDEST_BEAM).translations[0].hypotheses
    )
    assert len(hypotheses) == WIDEST_BEAM
    scores = [hypothesis.score for hypothesis in hypotheses]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("beam_size", [WIDEST_BEAM + 1, 2**32 - 1])
def test_beam_size_over_the_maximum(stub: pb_grpc.TranslatorStub, beam_size: int) -> None:
    code, details = refused(lambda: translate(stub, [GOOD_TEXT], beam_size=beam_size))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"beam_size {beam_size} exceeds the maximum {WIDEST_BEAM} for model dates version 1")


@pytest.mark.parametrize(("beam_size", "num_hypotheses"), [(0, 2), (3, 4), (WIDEST_BEAM, WIDEST_BEAM + 1)])
def test_num_hypotheses_above_the_beam_size(stub: pb_grpc.TranslatorStub, beam_size: int, num_hypotheses: int) -> None:
    code, details = refused(lambda: translate(stub, [GOOD_TEXT], beam_size=beam_size, num_hypotheses=num_hypotheses))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    beam = max(beam_size, 1)
    assert details.startswith(f"num_hypotheses {num_hypotheses} exceeds beam_size {beam}")


def test_max_length_zero_means_the_models_maximum(stub: pb_grpc.TranslatorStub) -> None:
    text = "1" * 40  # a long source: the tiny model tends to run to its length limit on it
    unset = translate(stub, [text]).translations[0].hypotheses[0]
    at_limit = translate(stub, [text], max_length=MAX_TARGET_TOKENS).translations[0].hypotheses[0]
    assert len(unset.target_tokens) <= MAX_TARGET_TOKENS
    assert list(unset.target_tokens) == list(at_limit.target_tokens)
    assert len(translate(stub, [text], max_length=1).translations[0].hypotheses[0].target_tokens) == 1


@pytest.mark.parametrize("max_length", [MAX_TARGET_TOKENS + 1, 2**32 - 1])
def test_a_huge_max_length(stub: pb_grpc.TranslatorStub, max_length: int) -> None:
    code, details = refused(lambda: translate(stub, [GOOD_TEXT], max_length=max_length))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        f"max_length {max_length} exceeds the maximum {MAX_TARGET_TOKENS} for model dates version 1 (its "
        "max_target_tokens)"
    )


@pytest.mark.parametrize("penalty", [-0.5, float("nan"), float("inf"), float("-inf")])
def test_length_penalty_negative_nan_and_infinite(stub: pb_grpc.TranslatorStub, penalty: float) -> None:
    code, details = refused(lambda: translate(stub, [GOOD_TEXT], beam_size=2, length_penalty=penalty))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"length_penalty {penalty} must be a finite number >= 0"


# ----- models and versions -------------------------------------------------------------------------------


def test_an_unknown_model_or_version(stub: pb_grpc.TranslatorStub) -> None:
    code, details = refused(lambda: translate(stub, [GOOD_TEXT], model="klingon"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "model 'klingon' not found; available models: dates, numbers"
    code, details = refused(lambda: translate(stub, [GOOD_TEXT], model="dates", version="7"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "model dates has no version 7; loaded versions: 1"
    for version in ("0", "-1", "01", "1.0", "latest", "9" * 12):
        code, details = refused(lambda version=version: translate(stub, [GOOD_TEXT], model="dates", version=version))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, version
        assert "is not valid: use a positive integer" in details


class _FilesystemWatch:
    """Records the paths Python opens or lists (audit events) while armed, in any thread."""

    EVENTS = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename", "os.chdir")

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.armed = False
        self._lock = threading.Lock()
        sys.addaudithook(self._hook)  # cannot be removed; costs one attribute check per event when disarmed

    def _hook(self, event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if not self.armed or event not in self.EVENTS or not args:
            return
        path = args[0]
        if isinstance(path, (str, bytes, Path)):
            with self._lock:
                self.paths.append(str(path if not isinstance(path, bytes) else path.decode("utf-8", "replace")))


_watch: _FilesystemWatch | None = None


@pytest.mark.parametrize(
    "name",
    [
        "../outside/evil",
        "..",
        "../../../../etc/passwd",
        "/etc/passwd",
        "dates/../dates",
        "dates/..",
        "..\\outside\\evil",
        "%2e%2e%2foutside%2fevil",
        "dates\x00",
        "．．／outside",  # fullwidth dots and slash
        "~root",
        "x" * 65,
    ],
)
def test_a_model_name_with_path_separators_or_dots(
    stub: pb_grpc.TranslatorStub, layout: tuple[Path, Path], name: str
) -> None:
    """Refused before anything else, and never touches the filesystem: the decoy model outside the
    repository is neither opened nor listed, and neither is anything else outside it."""
    global _watch
    _watch = _watch or _FilesystemWatch()
    repository, decoy = layout
    _watch.paths.clear()
    _watch.armed = True
    (decoy / "evil" / "1" / "model.json").read_bytes()  # the watch does see such an access ...
    assert any(str(decoy) in path for path in _watch.paths)
    _watch.paths.clear()  # ... and from here on, only the server's accesses count
    try:
        code, details = refused(lambda: translate(stub, [GOOD_TEXT], model=name))
        get_code, _ = refused(lambda: stub.GetModel(pb.GetModelRequest(name=name), timeout=10))
        stream_code, _ = refused(
            lambda: list(stub.TranslateStream(pb.TranslateRequest(model=name, texts=[GOOD_TEXT]), timeout=10))
        )
    finally:
        _watch.armed = False
    assert code == get_code == stream_code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("model name ") and "is not valid: use letters, digits" in details
    outside = [path for path in _watch.paths if str(decoy) in path or "passwd" in path or "outside" in path]
    assert outside == []


# ----- messages ------------------------------------------------------------------------------------------


def test_a_message_larger_than_the_maximum_receive_size(stub: pb_grpc.TranslatorStub) -> None:
    code, details = refused(lambda: translate(stub, ["x" * (5 << 20)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details and "4194304" in details


def test_bytes_that_are_not_a_valid_request_message(channel: grpc.Channel, stub: pb_grpc.TranslatorStub) -> None:
    raw = channel.unary_unary(
        "/attnserve.v1.Translator/Translate",
        request_serializer=lambda data: data,
        response_deserializer=pb.TranslateResponse.FromString,
    )
    invalid_utf8 = bytes([0x1A, 3, 0xFF, 0xFE, 0x41])  # field 3 (texts), 3 bytes that are not UTF-8
    for payload, why in ((invalid_utf8, "bad UTF-8"), (b"\xff\xff\xff", "corrupt")):
        code, details = refused(lambda payload=payload: raw(payload, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("the Translate request is not a valid protobuf message") and why in details


# ----- property-based ------------------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)  # protobuf strings are UTF-8
OPTIONS = st.fixed_dictionaries(  # mostly in range, sometimes far out of it
    {
        "beam_size": st.one_of(
            st.integers(0, WIDEST_BEAM),
            st.integers(0, WIDEST_BEAM),
            st.sampled_from([WIDEST_BEAM + 1, 2**31, 2**32 - 1]),
        ),
        "num_hypotheses": st.one_of(st.integers(0, 2), st.integers(0, WIDEST_BEAM + 2)),
        "max_length": st.one_of(
            st.integers(0, MAX_TARGET_TOKENS),
            st.integers(0, MAX_TARGET_TOKENS),
            st.sampled_from([MAX_TARGET_TOKENS + 1, 2**32 - 1]),
        ),
        "length_penalty": st.one_of(st.floats(0.0, 2.0), st.floats(0.0, 2.0), st.floats(width=32)),
        "return_attention": st.booleans(),
        "replace_unknowns": st.booleans(),
    }
)
EXPECTED_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    texts=st.lists(st.one_of(ANY_TEXT, st.sampled_from([GOOD_TEXT, "quarante-deux", "1" * 60])), max_size=5),
    model=st.one_of(st.sampled_from(["", "", "", "dates", "numbers", "nope", "../dates"]), st.text(max_size=8)),
    version=st.sampled_from(["", "", "", "1", "2", "x"]),
    options=OPTIONS,
    streaming=st.booleans(),
)
def test_random_texts_and_options_get_a_result_or_a_clear_status(
    stub: pb_grpc.TranslatorStub, texts: list[str], model: str, version: str, options: dict, streaming: bool
) -> None:
    request = pb.TranslateRequest(model=model, version=version, texts=texts, options=pb.DecodeOptions(**options))
    try:
        if streaming:
            messages = list(stub.TranslateStream(request, timeout=30))
            assert messages and messages[-1].final and not any(message.final for message in messages[:-1])
            translations = [messages[-1].hypotheses]
        else:
            translations = [translation.hypotheses for translation in stub.Translate(request, timeout=30).translations]
    except grpc.RpcError as error:
        event(error.code().name)
        assert error.code() in EXPECTED_REFUSALS, (error.code(), error.details())
        assert error.details(), "a refusal must say what was wrong"
        return
    event("OK")
    assert len(translations) == len(texts)
    wanted = max(options["num_hypotheses"], 1)
    for hypotheses in translations:
        assert 1 <= len(hypotheses) <= wanted
        assert all(math.isfinite(hypothesis.score) for hypothesis in hypotheses)
        for hypothesis in hypotheses:
            if options["return_attention"]:
                assert len(hypothesis.attention) == len(hypothesis.target_tokens) * len(hypothesis.source_tokens)


def test_the_server_is_healthy_after_the_catalogue(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@st.composite
def valid_options(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    beam = draw(st.integers(0, WIDEST_BEAM))
    return {
        "beam_size": beam,
        "num_hypotheses": draw(st.integers(0, max(beam, 1))),
        "max_length": draw(st.integers(0, MAX_TARGET_TOKENS)),
        "length_penalty": draw(st.floats(0.0, 2.0)),
        "return_attention": draw(st.booleans()),
        "replace_unknowns": draw(st.booleans()),
    }


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    texts=st.lists(
        ANY_TEXT.filter(lambda text: 1 <= shortest_normalized_length(text) and normalized_length(text) <= 40),
        min_size=1,
        max_size=4,
    ),
    model=st.sampled_from(["", "dates", "numbers"]),
    options=valid_options(),
)
def test_any_unicode_text_within_the_limits_is_translated(
    stub: pb_grpc.TranslatorStub, texts: list[str], model: str, options: dict
) -> None:
    """Whatever the characters (unseen, control, combining, emoji, any script), a text within the limits
    with options within the limits gets a translation: never an error."""
    response = stub.Translate(
        pb.TranslateRequest(model=model, texts=texts, options=pb.DecodeOptions(**options)), timeout=30
    )
    longest = stub.GetModel(pb.GetModelRequest(name=model), timeout=30).limits.max_target_tokens
    assert len(response.translations) == len(texts)
    for text, translation in zip(texts, response.translations, strict=True):
        assert 1 <= len(translation.hypotheses) <= max(options["num_hypotheses"], 1)
        best = translation.hypotheses[0]
        assert best.source_tokens[-1] == "</s>" and len(best.source_tokens) <= normalized_length(text) + 1
        assert len(best.target_tokens) <= (options["max_length"] or longest)
        assert all(math.isfinite(hypothesis.score) for hypothesis in translation.hypotheses)

"""Who may talk to the server: TLS with a certificate made by the test, mutual TLS, bearer tokens (from a
file and from the environment), open health checks, reflection off, per-connection call limits, and no
input text in the logs. Every server here is the real one on a loopback port."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import logging
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from client.translate import main as client_main
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.grpc_api.security import BearerTokens, SecurityConfigError, bearer_token, channel_credentials, open_channel
from service.server import serve
from service.settings import Settings, SettingsError
from tests.reliability.reliability_support import CertificateAuthority, metric, scrape, wait_for
from tests.service.http_client import call
from tests.service.server_harness import ServerThread, make_settings, with_settings

pytestmark = pytest.mark.slow

TEXT = "3 mars 1999"
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    rogue: CertificateAuthority
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder, "trusted"), CertificateAuthority(folder, "rogue")
    server, client, rogue_client = (
        ca.issue("server"),
        ca.issue("client", client=True),
        rogue.issue("client", client=True),
    )
    return Pki(
        ca,
        rogue,
        server.cert_file,
        server.key_file,
        client.cert_file,
        client.key_file,
        rogue_client.cert_file,
        rogue_client.key_file,
    )


def translate(channel: grpc.Channel, metadata: tuple = ()) -> pb.TranslateResponse:  # type: ignore[type-arg]
    return pb_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=[TEXT]), timeout=15, metadata=metadata)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=15).status


def refused(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details() or ""


def tls_channel(address: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    return grpc.secure_channel(address, channel_credentials(ca, cert, key))


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """An HTTPS client's context: trust `ca`, present `cert` (mutual TLS) when given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def https_translate(server: ServerThread, context: ssl.SSLContext, host: str = "127.0.0.1") -> int:
    """POST /v1/translate on the HTTP port over TLS; the HTTP status."""
    url = f"https://{host}:{server.settings.http_port}/v1/translate"
    return call("POST", url, {"texts": [TEXT]}, context=context).status


def https_refused(server: ServerThread, context: ssl.SSLContext) -> None:
    """The TLS handshake on the HTTP port fails (ssl.SSLError, or the connection is reset by the peer)."""
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        https_translate(server, context)


# ----- TLS and mutual TLS --------------------------------------------------------------------------------


def test_tls_serves_tls_clients_only(tiny_repository: Path, pki: Pki) -> None:
    settings = make_settings(tiny_repository, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    server = ServerThread(settings).start()
    try:
        with tls_channel(server.address, pki.ca.cert_file) as channel:
            assert translate(channel).translations[0].hypotheses[0].text
            assert health_status(channel) == SERVING
        with tls_channel(f"localhost:{settings.port}", pki.ca.cert_file) as channel:  # the name in the certificate
            assert translate(channel).translations
        with grpc.insecure_channel(server.address) as plaintext:
            code, _ = refused(lambda: translate(plaintext))
            assert code == grpc.StatusCode.UNAVAILABLE
        with tls_channel(server.address, pki.rogue.cert_file) as untrusting:  # trusts another CA only
            code, _ = refused(lambda: translate(untrusting))
            assert code == grpc.StatusCode.UNAVAILABLE
        # The HTTP port: the same certificate, TLS only.
        assert https_translate(server, tls_context(pki.ca.cert_file)) == 200
        assert https_translate(server, tls_context(pki.ca.cert_file), host="localhost") == 200
        https_refused(server, tls_context(pki.rogue.cert_file))
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected, http.client.BadStatusLine)):
            call("GET", f"{server.http_url}/v2/health/live")  # plaintext on the TLS port
    finally:
        assert server.stop() == 0


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(tiny_repository: Path, pki: Pki) -> None:
    settings = make_settings(
        tiny_repository, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca.cert_file
    )
    server = ServerThread(settings).start()
    try:
        with tls_channel(server.address, pki.ca.cert_file, pki.client_cert, pki.client_key) as channel:
            assert translate(channel).translations[0].hypotheses[0].text
        with tls_channel(server.address, pki.ca.cert_file) as anonymous:
            code, _ = refused(lambda: translate(anonymous))
            assert code == grpc.StatusCode.UNAVAILABLE
        with tls_channel(server.address, pki.ca.cert_file, pki.rogue_client_cert, pki.rogue_client_key) as rogue:
            code, _ = refused(lambda: translate(rogue))
            assert code == grpc.StatusCode.UNAVAILABLE
        assert https_translate(server, tls_context(pki.ca.cert_file, pki.client_cert, pki.client_key)) == 200
        https_refused(server, tls_context(pki.ca.cert_file))
        https_refused(server, tls_context(pki.ca.cert_file, pki.rogue_client_cert, pki.rogue_client_key))
    finally:
        assert server.stop() == 0


def test_a_renewed_certificate_is_used_without_a_restart(tiny_repository: Path, pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    server = ServerThread(make_settings(tiny_repository, tls_cert_file=cert, tls_key_file=key)).start()
    try:
        with tls_channel(server.address, pki.ca.cert_file) as channel:
            assert translate(channel).translations
        renewed_ca = CertificateAuthority(tmp_path / "renewed", "renewed")
        renewed = renewed_ca.issue("server")
        for source, target in ((renewed.key_file, key), (renewed.cert_file, cert)):  # atomic replacement
            staging = target.with_suffix(".new")
            staging.write_bytes(source.read_bytes())
            os.replace(staging, target)

        def renewed_in_use() -> bool:
            with tls_channel(server.address, renewed_ca.cert_file) as fresh:
                try:
                    return bool(translate(fresh).translations)
                except grpc.RpcError:
                    return False

        wait_for(renewed_in_use, what="new connections to get the renewed certificate")
        with tls_channel(server.address, pki.ca.cert_file) as old_trust:
            code, _ = refused(lambda: translate(old_trust))
            assert code == grpc.StatusCode.UNAVAILABLE

        def renewed_in_use_over_http() -> bool:
            try:
                return https_translate(server, tls_context(renewed_ca.cert_file)) == 200
            except (ssl.SSLError, ConnectionResetError):
                return False

        wait_for(renewed_in_use_over_http, what="new HTTPS connections to get the renewed certificate")
        https_refused(server, tls_context(pki.ca.cert_file))
    finally:
        assert server.stop() == 0


# ----- bearer tokens -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("# clients of the translation service\nfile-token-alpha\n\n  file-token-beta  \n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def guarded(tiny_repository: Path, token_file: Path) -> Iterator[ServerThread]:
    settings = make_settings(tiny_repository, auth_tokens_file=token_file, auth_tokens="env-token-1, env-token-2")
    server = ServerThread(settings).start()
    yield server
    assert server.stop() == 0


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_calls_need_a_valid_bearer_token(guarded: ServerThread) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        code, details = refused(lambda: translate(channel))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details == "this server needs a bearer token: send the metadata 'authorization: Bearer <token>'"
        for metadata in (
            bearer("file-token-alph"),
            bearer("file-token-alpha2"),
            bearer(""),
            (("authorization", "Basic ZmlsZS10b2tlbi1hbHBoYQ=="),),
            (("x-api-key", "file-token-alpha"),),
        ):
            code, details = refused(lambda metadata=metadata: translate(channel, metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED, metadata
        for token in ("file-token-alpha", "file-token-beta", "env-token-1", "env-token-2"):
            assert translate(channel, bearer(token)).translations[0].hypotheses[0].text
        assert translate(channel, (("authorization", "bearer env-token-1"),)).translations  # the scheme is case-blind
        # Every method of the API is guarded, streaming and listing included, and unknown methods too.
        code, _ = refused(lambda: list(stub.TranslateStream(pb.TranslateRequest(texts=[TEXT]), timeout=15)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = refused(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=15))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        unknown = channel.unary_unary(
            "/attnserve.v1.Translator/NoSuchMethod",
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )
        code, _ = refused(lambda: unknown(b"", timeout=15))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ListModels(pb.ListModelsRequest(), timeout=15, metadata=bearer("env-token-2")).models


def test_http_calls_need_a_valid_bearer_token_and_health_stays_open(guarded: ServerThread) -> None:
    base = guarded.http_url
    missing = call("POST", f"{base}/v1/translate", {"texts": [TEXT]})
    assert missing.status == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json() == {
        "error": "this server needs a bearer token: send the header 'Authorization: Bearer <token>'",
        "code": "UNAUTHENTICATED",
    }
    wrong = call("POST", f"{base}/v2/models/dates/infer", {}, {"Authorization": "Bearer file-token-alph"})
    assert (wrong.status, wrong.json()["error"]) == (401, "the bearer token is not valid")
    for path in ("/v1/models", "/v2", "/v2/models/dates", "/v2/models/dates/ready"):
        assert call("GET", base + path).status == 401, path
        assert call("GET", base + path, headers={"Authorization": "Bearer file-token-beta"}).status == 200, path
    good = call("POST", f"{base}/v1/translate", {"texts": [TEXT]}, {"Authorization": "bearer env-token-2"})
    assert good.status == 200 and good.json()["translations"]
    # Probes, the page and the API's description carry no token.
    for path in ("/v2/health/live", "/v2/health/ready", "/", "/static/app.js", "/openapi.json"):
        assert call("GET", base + path).status == 200, path


def test_health_checks_stay_open_and_reflection_needs_a_token(guarded: ServerThread) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        for service in ("", "dates", "attnserve.v1.Translator"):
            assert health_status(channel, service) == SERVING  # probes carry no token
        with pytest.raises(grpc.RpcError) as raised:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_refused_calls_are_counted_and_no_token_reaches_the_logs(
    guarded: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    before = scrape(guarded.metrics_url)
    with grpc.insecure_channel(guarded.address) as channel:
        for _ in range(3):
            refused(lambda: translate(channel, bearer("guess-token-xyz")))
        translate(channel, bearer("env-token-1"))
        # Paths the server does not serve are counted under one method label, whatever a client names.
        for path in ("/attnserve.v1.Translator/Nope", "/made.up.Service/Anything"):
            refused(lambda path=path: channel.unary_unary(path)(b"", timeout=15))
    unknown = {"model": "", "version": "", "method": "unknown", "code": "UNAUTHENTICATED", "protocol": "grpc"}
    wait_for(
        lambda: (
            metric(scrape(guarded.metrics_url), "attnserve_requests_total", **unknown)
            - metric(before, "attnserve_requests_total", **unknown)
            == 2
        ),
        what="the refused calls to unknown methods to be counted",
    )
    after = scrape(guarded.metrics_url)
    assert not any(("method", "Nope") in labels or ("method", "Anything") in labels for _, labels in after)
    wait_for(
        lambda: (
            metric(
                scrape(guarded.metrics_url),
                "attnserve_requests_total",
                model="",
                version="",
                method="Translate",
                code="UNAUTHENTICATED",
                protocol="grpc",
            )
            - metric(
                before,
                "attnserve_requests_total",
                model="",
                version="",
                method="Translate",
                code="UNAUTHENTICATED",
                protocol="grpc",
            )
            == 3
        ),
        what="the refused calls to be counted",
    )
    assert "guess-token-xyz" not in caplog.text and "env-token-1" not in caplog.text


def test_the_tokens_file_is_re_read_when_it_changes(tiny_repository: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("first-token\n", encoding="utf-8")
    server = ServerThread(make_settings(tiny_repository, auth_tokens_file=tokens)).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            assert translate(channel, bearer("first-token")).translations
            staging = tmp_path / "tokens.new"
            staging.write_text("second-token\n", encoding="utf-8")
            os.replace(staging, tokens)  # rotate: the first token is revoked, the second accepted

            def rotated() -> bool:
                try:
                    translate(channel, bearer("second-token"))
                except grpc.RpcError:
                    return False
                return True

            wait_for(rotated, what="the new token to be accepted")
            code, _ = refused(lambda: translate(channel, bearer("first-token")))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            tokens.unlink()  # a file that disappears keeps the last tokens in force (and says so in the log)
            assert translate(channel, bearer("second-token")).translations
    finally:
        assert server.stop() == 0


def test_bearer_tokens_parsing_and_comparison(tmp_path: Path) -> None:
    assert bearer_token([("authorization", "Bearer abc ")]) == "abc"
    assert bearer_token([("Authorization", "bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None and bearer_token([]) is None
    store = BearerTokens(["alpha", "beta"])
    assert store.accepts("alpha") and store.accepts("beta")
    assert not any(store.accepts(guess) for guess in ("", None, "alph", "alphaa", "ALPHA", "alpha\n"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n", encoding="utf-8")
    with pytest.raises(SecurityConfigError, match="holds no token"):
        BearerTokens([], empty)
    with pytest.raises(SecurityConfigError, match="cannot read it"):
        BearerTokens([], tmp_path / "missing.txt")


# ----- reflection, per-connection limits, logs -----------------------------------------------------------


def test_reflection_can_be_turned_off(tiny_repository: Path) -> None:
    server = ServerThread(make_settings(tiny_repository, reflection=False)).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert translate(channel).translations
    finally:
        assert server.stop() == 0


def test_one_connection_cannot_hold_more_calls_than_max_concurrent_streams(tiny_repository: Path) -> None:
    """40 calls of 4 texts at once on one connection limited to 4 streams: the server never holds more
    than 4 calls (16 texts); calls beyond the limit wait in the client or are refused at the HTTP/2
    layer (UNAVAILABLE, RST_STREAM: never started, safe to retry), depending on grpc's timing."""
    server = ServerThread(make_settings(tiny_repository, max_concurrent_streams=4, batching="none")).start()
    dates = {"model": "dates", "version": "1"}
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            translate(channel)
            before = scrape(server.metrics_url)
            request = pb.TranslateRequest(texts=[TEXT] * 4, options=pb.DecodeOptions(beam_size=4))
            futures = [stub.Translate.future(request, timeout=60) for _ in range(40)]
            held: list[float] = []
            while not all(future.done() for future in futures):
                samples = scrape(server.metrics_url)
                held.append(
                    metric(samples, "attnserve_requests_waiting", **dates)
                    + metric(samples, "attnserve_requests_running", **dates)
                )
            codes, details = [], set()
            for future in futures:
                try:
                    future.result()
                    codes.append("OK")
                except grpc.RpcError as error:
                    codes.append(error.code().name)
                    details.add(error.details() or "")
            assert set(codes) <= {"OK", "UNAVAILABLE"} and "OK" in codes
            assert all("RST_STREAM" in text for text in details)
            assert max(held) <= 4 * 4, held
            ok = codes.count("OK")

            def translate_calls(samples: dict) -> float:  # type: ignore[type-arg]
                return sum(
                    value
                    for (name, labels), value in samples.items()
                    if name == "attnserve_requests_total" and ("method", "Translate") in labels
                )

            wait_for(
                lambda: translate_calls(scrape(server.metrics_url)) - translate_calls(before) >= ok,
                what="the admitted calls to be counted",
            )
            # Refused calls never reached the server's handlers: it counted exactly the admitted ones.
            assert translate_calls(scrape(server.metrics_url)) - translate_calls(before) == ok
            assert translate(channel).translations  # the connection still works
    finally:
        assert server.stop() == 0


def test_no_input_text_in_the_logs_at_info_level(tiny_repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    marker = "zqxj 3 mars 1999 wvyk"
    server = ServerThread(make_settings(tiny_repository, log_level="INFO")).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            stub.Translate(pb.TranslateRequest(texts=[marker]), timeout=15)
            list(stub.TranslateStream(pb.TranslateRequest(texts=[marker]), timeout=15))
            for request in (
                pb.TranslateRequest(texts=[marker * 10]),  # too many tokens
                pb.TranslateRequest(texts=[marker], options=pb.DecodeOptions(beam_size=99)),
                pb.TranslateRequest(model="klingon", texts=[marker]),
                pb.TranslateRequest(texts=[marker, ""]),
            ):
                refused(lambda request=request: stub.Translate(request, timeout=15))
    finally:
        assert server.stop() == 0
    assert caplog.records, "nothing was logged at all; the test proved nothing"
    assert "zqxj" not in caplog.text and "wvyk" not in caplog.text


# ----- settings and start-up -----------------------------------------------------------------------------


def test_security_settings_from_flags_and_environment(tmp_path: Path) -> None:
    settings = Settings.from_sources(
        ["--tls-cert-file", "/etc/attnserve/tls.crt", "--reflection", "off", "--max-concurrent-streams", "32"],
        {
            "ATTNSERVE_TLS_KEY_FILE": "/etc/attnserve/tls.key",
            "ATTNSERVE_AUTH_TOKENS": "s3cret-one,s3cret-two",
            "ATTNSERVE_AUTH_TOKENS_FILE": "/etc/attnserve/tokens",
            "ATTNSERVE_REPOSITORY_POLL_SECONDS": "2.5",
        },
    )
    assert settings.tls_cert_file == Path("/etc/attnserve/tls.crt") and settings.tls_key_file == Path(
        "/etc/attnserve/tls.key"
    )
    assert settings.tls_client_ca_file is None and settings.reflection is False
    assert settings.max_concurrent_streams == 32 and settings.repository_poll_seconds == 2.5
    assert settings.auth_tokens.get_secret_value() == "s3cret-one,s3cret-two" and settings.auth_tokens_file == Path(
        "/etc/attnserve/tokens"
    )
    assert "s3cret" not in repr(settings)  # never in a log line that prints the settings
    assert Settings.from_sources([], {"ATTNSERVE_TLS_CERT_FILE": ""}).tls_cert_file is None  # empty = unset
    with pytest.raises(SystemExit):  # tokens have no flag: a flag would show them in the process table
        Settings.from_sources(["--auth-tokens", "s3cret"], {})


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--tls-cert-file", "a.pem"], {}, "tls_cert_file=a.pem and tls_key_file=(unset): set both (TLS) or neither"),
        (["--tls-key-file", "k.pem"], {}, "set both (TLS) or neither"),
        (["--tls-client-ca-file", "ca.pem"], {}, "tls_client_ca_file=ca.pem needs tls_cert_file and tls_key_file"),
        (["--reflection", "maybe"], {}, "--reflection=maybe: reflection must be true or false"),
        ([], {"ATTNSERVE_MAX_CONCURRENT_STREAMS": "-1"}, "max_concurrent_streams must be 0..2147483647"),
        ([], {"ATTNSERVE_REPOSITORY_POLL_SECONDS": "nan"}, "repository_poll_seconds must be a finite number"),
    ],
)
def test_bad_security_settings_say_what_is_wrong(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_sources(argv, environ)
    assert message in str(raised.value)


def test_a_security_file_that_does_not_load_stops_the_start_before_any_model_loads(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="attnserve.server")
    empty_tokens = tmp_path / "tokens.txt"
    empty_tokens.write_text("\n# none\n", encoding="utf-8")
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello", encoding="utf-8")
    # The repository does not exist: had the models been loaded first, the exit status would be 1.
    base = Settings(model_repository=tmp_path / "no-repository", metrics_port=0, port=1)
    for changes, logged in (
        ({"tls_cert_file": tmp_path / "missing.pem", "tls_key_file": pki.server_key}, "missing.pem: cannot read it"),
        ({"tls_cert_file": not_pem, "tls_key_file": pki.server_key}, "cert.txt: not a PEM file"),
        ({"tls_cert_file": pki.server_cert, "tls_key_file": pki.client_key}, "do not load as a certificate chain"),
        (
            {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key, "tls_client_ca_file": not_pem},
            "tls_client_ca_file=",
        ),
        ({"auth_tokens_file": empty_tokens}, "tokens.txt holds no token"),
        ({"auth_tokens": " , "}, "ATTNSERVE_AUTH_TOKENS holds no token"),
    ):
        caplog.clear()
        assert asyncio.run(serve(with_settings(base, **changes), stop=asyncio.Event())) == 2, changes
        assert logged in caplog.text, (changes, caplog.text)


def test_the_cli_client_speaks_tls_and_sends_its_token(
    tiny_repository: Path, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n", encoding="utf-8")
    settings = make_settings(
        tiny_repository, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, auth_tokens="cli-token"
    )
    server = ServerThread(settings).start()
    try:
        base = ["--server", f"localhost:{settings.port}", "--tls-ca-file", str(pki.ca.cert_file)]
        assert client_main([*base, "--token-file", str(token_file), TEXT]) == 0
        assert "score" in capsys.readouterr().out
        monkeypatch.setenv("ATTNSERVE_TOKEN", "cli-token")
        assert client_main([*base, "--stream", TEXT]) == 0
        capsys.readouterr()
        monkeypatch.delenv("ATTNSERVE_TOKEN")
        assert client_main([*base, TEXT]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        with open_channel(server.address, ca_file=pki.ca.cert_file, server_name="localhost") as channel:
            assert translate(channel, bearer("cli-token")).translations
    finally:
        assert server.stop() == 0

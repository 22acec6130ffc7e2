"""Who may talk to the gRPC port: TLS (optionally mutual) and bearer tokens.

Server side:
- `server_credentials(settings)`: TLS credentials from the PEM files in the settings (None = plaintext).
  The files are checked at start (readable, a key that matches the certificate) and re-read when they
  change, so a rotated certificate (cert-manager, a renewed Let's Encrypt file) is used by the next
  connection without a restart.
- `BearerTokens` + `TokenAuthInterceptor`: a call needs the metadata `authorization: Bearer TOKEN` with
  one of the configured tokens, except health checks (probes carry no token). A refused call gets
  UNAUTHENTICATED before its request message is even parsed.

Tokens are compared in constant time: the presented token and every accepted one are reduced to
SHA-256 digests of equal length and compared with `hmac.compare_digest`, against every accepted token
without stopping at a match, so the time taken says neither how much of a guess was right nor which
token it matched. Tokens are never logged.

Client side: `channel_credentials(...)` and `open_channel(...)` build the matching channel, and
`token_metadata(token)` the call metadata.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from service.errors import Unauthenticated
from service.grpc_api.errors import status_for
from service.settings import Settings

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "bearer "
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
"""Methods every caller may use: liveness and readiness probes send no token."""


class SecurityConfigError(RuntimeError):
    """A TLS or token file is missing, unreadable, malformed or empty; the message says which and why."""


# ----- TLS -----------------------------------------------------------------------------------------------


def _read_pem(path: Path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"{setting}={path}: cannot read it: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{setting}={path}: not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class _FileStamp:
    mtime_ns: int
    size: int


def _stamp(path: Path) -> _FileStamp | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return _FileStamp(status.st_mtime_ns, status.st_size)


class CertificateFiles:
    """The server's certificate, key and (for mutual TLS) client CA, re-read when any file changes.

    `fetch()` is grpc's certificate-configuration fetcher: it is called on a grpc thread before each
    TLS handshake and returns a new configuration only when the files changed (None = keep the current
    one). A change that does not load (a half-written file, a key that does not match) is logged and
    the previous certificate stays in use.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file is not None else None
        self._stamps = self._current_stamps()
        self.initial = self._configuration()

    @property
    def mutual(self) -> bool:
        """True when clients must present a certificate signed by client_ca_file."""
        return self.client_ca_file is not None

    def _paths(self) -> list[Path]:
        return [self.cert_file, self.key_file] + ([self.client_ca_file] if self.client_ca_file else [])

    def _current_stamps(self) -> list[_FileStamp | None]:
        return [_stamp(path) for path in self._paths()]

    def _configuration(self) -> Any:
        cert = _read_pem(self.cert_file, "tls_cert_file")
        key = _read_pem(self.key_file, "tls_key_file")
        try:
            # The ssl module parses both and checks that the key belongs to the certificate, so a mistake
            # is reported now, with the file names, rather than as a failed handshake on every client.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as error:
            raise SecurityConfigError(
                f"tls_cert_file={self.cert_file} and tls_key_file={self.key_file} do not load as a certificate "
                f"chain and its private key: {error}"
            ) from None
        client_ca: bytes | None = None
        if self.client_ca_file is not None:
            client_ca = _read_pem(self.client_ca_file, "tls_client_ca_file")
            try:
                ssl.create_default_context(cafile=str(self.client_ca_file))
            except (ssl.SSLError, OSError) as error:
                raise SecurityConfigError(
                    f"tls_client_ca_file={self.client_ca_file}: not a CA certificate bundle: {error}"
                ) from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self) -> Any:
        stamps = self._current_stamps()
        if stamps == self._stamps:
            return None
        try:
            configuration = self._configuration()
        except SecurityConfigError as error:
            log.error("the TLS files changed but do not load; still using the previous certificate: %s", error)
            return None
        self._stamps = stamps
        log.info("TLS certificate files changed: new connections use the new certificate")
        return configuration


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port from settings.tls_*; None when TLS is off (no certificate).

    Raises SecurityConfigError when a file cannot be read or the key does not match the certificate.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = CertificateFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch, require_client_authentication=files.mutual)


# ----- bearer tokens -------------------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_token_lines(text: str) -> list[str]:
    """Tokens of a tokens file: one per line, surrounding spaces ignored, blank lines and '#' lines skipped."""
    tokens = []
    for line in text.splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            tokens.append(token)
    return tokens


def parse_token_list(text: str) -> list[str]:
    """Tokens of ATTNSERVE_AUTH_TOKENS: comma-separated, surrounding spaces ignored."""
    return [token.strip() for token in text.split(",") if token.strip()]


class BearerTokens:
    """The accepted bearer tokens: those given inline (the environment) plus those of a tokens file.

    The file is checked for changes at most every `recheck_s` seconds (a stat, on the calling thread)
    and re-read when it changed, so tokens can be added and revoked without a restart. Write it
    atomically (write a temporary file, then rename it over the old one). If it cannot be read, the
    previous tokens stay in force and the error is logged.
    """

    def __init__(self, inline: Sequence[str] = (), file: Path | None = None, *, recheck_s: float = 1.0) -> None:
        self._inline = [_digest(token) for token in inline]
        self._file = Path(file) if file is not None else None
        self._recheck_s = recheck_s
        self._file_digests: list[bytes] = []
        self._file_stamp: _FileStamp | None = None
        self._next_check = 0.0
        if self._file is not None:
            self._file_digests = self._read_file(strict=True)
        if not self._inline and not self._file_digests:
            where = f"auth_tokens_file={self._file}" if self._file is not None else "ATTNSERVE_AUTH_TOKENS"
            raise SecurityConfigError(f"{where} holds no token: every call would be refused")

    @classmethod
    def from_settings(cls, settings: Settings) -> BearerTokens | None:
        """The tokens configured in the settings, or None when authentication is off (no token source).

        Raises SecurityConfigError when a source is configured but unreadable or holds no token."""
        secret = settings.auth_tokens.get_secret_value()
        inline = parse_token_list(secret)
        if not inline and settings.auth_tokens_file is None:
            if secret.strip():
                raise SecurityConfigError("ATTNSERVE_AUTH_TOKENS holds no token (only commas and spaces)")
            return None
        return cls(inline, settings.auth_tokens_file)

    @property
    def count(self) -> int:
        """How many tokens are accepted now."""
        return len(self._inline) + len(self._file_digests)

    def accepts(self, presented: str | None) -> bool:
        """True when `presented` is one of the accepted tokens (constant time in its content)."""
        self._maybe_reload()
        if not presented:
            return False
        candidate = _digest(presented)
        matched = False
        for accepted in (*self._inline, *self._file_digests):
            # No early exit: every accepted token is compared, whatever matched.
            matched |= hmac.compare_digest(candidate, accepted)
        return matched

    def _maybe_reload(self) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._recheck_s
        if _stamp(self._file) == self._file_stamp:
            return
        try:
            self._file_digests = self._read_file(strict=False)
            log.info("bearer tokens re-read from %s: %d accepted", self._file, self.count)
        except SecurityConfigError as error:
            log.error("%s; the previous tokens stay in force", error)

    def _read_file(self, *, strict: bool) -> list[bytes]:
        assert self._file is not None
        stamp = _stamp(self._file)
        try:
            text = self._file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise SecurityConfigError(f"auth_tokens_file={self._file}: cannot read it: {reason}") from None
        tokens = parse_token_lines(text)
        if strict and not tokens and not self._inline:
            raise SecurityConfigError(f"auth_tokens_file={self._file} holds no token: every call would be refused")
        self._file_stamp = stamp
        return [_digest(token) for token in tokens]


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization: Bearer TOKEN` metadata, or None when there is none."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION_KEY:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if text[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            return text[len(BEARER_PREFIX) :].strip()
        return None
    return None


def _refusal(message: str) -> Callable[..., Awaitable[Any]]:
    status, details = status_for(Unauthenticated(message))

    async def refuse(_request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(status, details)

    return refuse


def _refusing_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without parsing the request."""
    refuse = _refusal(message)
    serializer = handler.response_serializer if handler is not None else None
    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=serializer)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, response_serializer=serializer)
    # Unknown methods are refused the same way, so an unauthenticated caller cannot probe which exist.
    return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serializer)


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Admits a call only with a valid bearer token; health checks are always admitted.

    Place it after RpcInterceptor in the server's interceptor list, so refused calls are still
    counted in the per-RPC metrics (code UNAUTHENTICATED).
    """

    def __init__(self, tokens: BearerTokens, open_prefixes: Sequence[str] = (HEALTH_METHOD_PREFIX,)) -> None:
        self._tokens = tokens
        self._open_prefixes = tuple(open_prefixes)
        # One refusing handler per (handler it stands in for, reason), made once: a bounded set, since unknown
        # methods (handler None) share theirs, so a wrapping interceptor can wrap each once too.
        self._refusals: dict[tuple[int, str], tuple[grpc.RpcMethodHandler | None, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self._open_prefixes):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if self._tokens.accepts(token):
            return await continuation(handler_call_details)
        message = (
            "this server needs a bearer token: send the metadata 'authorization: Bearer <token>'"
            if token is None
            else "the bearer token is not valid"
        )
        handler = await continuation(handler_call_details)
        key = (id(handler), message)
        cached = self._refusals.get(key)
        if cached is None:
            cached = self._refusals[key] = (handler, _refusing_handler(handler, message))
        return cached[1]


# ----- client side ---------------------------------------------------------------------------------------


def channel_credentials(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a client: trust `ca_file` (None = the system's roots) and, for mutual TLS,
    present `cert_file` with `key_file`. Raises SecurityConfigError for an unreadable file."""
    if (cert_file is None) != (key_file is None):
        raise SecurityConfigError("a client certificate needs both its certificate file and its key file")
    root = _read_pem(ca_file, "tls_ca_file") if ca_file is not None else None
    cert = _read_pem(cert_file, "tls_cert_file") if cert_file is not None else None
    key = _read_pem(key_file, "tls_key_file") if key_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def open_channel(
    address: str,
    *,
    tls: bool = False,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    server_name: str = "",
) -> grpc.Channel:
    """A synchronous client channel: plaintext, or TLS when `tls` or any file is given.

    `server_name` overrides the name checked against the server's certificate (e.g. when connecting
    by IP address to a certificate issued for a host name)."""
    if not (tls or ca_file or cert_file or key_file):
        return grpc.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, channel_credentials(ca_file, cert_file, key_file), options=options)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (empty when there is no token)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()

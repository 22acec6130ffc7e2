"""Who may talk to the HTTP port: the same TLS files and bearer tokens as the gRPC port (service/grpc_api/security.py).

- `TlsFiles`: an ssl.SSLContext from settings.tls_* (mutual TLS when tls_client_ca_file is set), checked at start
  with the gRPC port's checks, and loaded again when the files change (`refresh()`, which the server calls every
  second), so a rotated certificate is presented by the next connection. A client CA file that changes adds its
  certificates to those trusted; one removed from it stays trusted until the server restarts.
- `refusal(tokens, headers)`: why a request's `Authorization: Bearer TOKEN` header is not accepted (None when it
  is), with the same BearerTokens (constant-time comparison, the tokens file re-read when it changes).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping

from service.grpc_api.security import BearerTokens, CertificateFiles, bearer_token
from service.settings import Settings

log = logging.getLogger(__name__)


class TlsFiles:
    """The HTTP port's TLS context from the settings' PEM files; raises SecurityConfigError when they do not load."""

    def __init__(self, settings: Settings) -> None:
        assert settings.tls_cert_file is not None and settings.tls_key_file is not None
        # The gRPC port's checks (readable PEM files, a key that matches the certificate, a CA bundle), and its
        # change detection.
        self._files = CertificateFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        # A bare server context: no system CA is trusted for client certificates, only tls_client_ca_file's.
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load()

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """None when TLS is off (no certificate)."""
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        return cls(settings)

    def _load(self) -> None:
        files = self._files
        self.context.load_cert_chain(files.cert_file, files.key_file)
        if files.client_ca_file is not None:
            self.context.load_verify_locations(cafile=str(files.client_ca_file))
            self.context.verify_mode = ssl.CERT_REQUIRED

    def refresh(self) -> None:
        """Load the files again if they changed and load (CertificateFiles.fetch checks both); otherwise keep
        the current certificate."""
        if self._files.fetch() is None:
            return
        try:
            self._load()
        except (ssl.SSLError, OSError) as error:
            log.error("the TLS files changed but do not load for HTTP; still using the previous certificate: %s", error)


def refusal(tokens: BearerTokens, headers: Mapping[str, str]) -> str | None:
    """Why the request's bearer token is refused, or None when it is accepted."""
    token = bearer_token(list(headers.items()))
    if tokens.accepts(token):
        return None
    if token is None:
        return "this server needs a bearer token: send the header 'Authorization: Bearer <token>'"
    return "the bearer token is not valid"

"""The server's one typed settings object, built once in `attnserve serve` and passed down.

Every field can be set by a command-line flag (`--model-repository`, `--port`, ...) or by an
`ATTNSERVE_<FIELD>` environment variable (`ATTNSERVE_PORT=50052`); a flag wins over the environment,
which wins over the default. Secrets (`auth_tokens`) come from the environment only and are never shown. Values
are checked against their bounds when the object is built, and
a bad value's message names where it came from, the value and the bound:
`ATTNSERVE_PORT=70000: port must be 1..65535`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ENV_PREFIX = "ATTNSERVE_"

PROVIDERS = ("auto", "cpu", "cuda")
BATCHING_POLICIES = ("continuous", "request", "none")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting has a bad value; the message says which, where it came from, the value and the bound."""


def _bounded(default: Any, *, minimum: float | None = None, maximum: float | None = None) -> Any:
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum})


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _optional_path() -> Any:
    """A file setting that may be left unset (None; an empty flag or variable also means unset)."""
    return field(default=None, metadata={"kind": Path, "optional": True})


def _secret() -> Any:
    """Text set only from the environment (never a flag: the process table shows flags) and never shown."""
    return field(default="", repr=False, metadata={"environment_only": True, "secret": True})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `attnserve serve` can be told, with its unit and bounds."""

    model_repository: Path = Path("models")
    """Folder holding the model repository (`<name>/<version>/model.json`, see docs/model-format.md)."""

    host: str = "0.0.0.0"
    """Address the gRPC server and the metrics endpoint listen on, e.g. `0.0.0.0`, `127.0.0.1`, `[::]`."""

    port: int = _bounded(50051, minimum=1, maximum=65535)
    """TCP port of the gRPC server (Translator, KServe v2 GRPCInferenceService, Health and Reflection services)."""

    metrics_port: int = _bounded(8002, minimum=0, maximum=65535)
    """TCP port of the Prometheus endpoint (`/metrics`); 0 turns it off."""

    default_model: str = ""
    """Model used when a request names none; empty = the only model, else the alphabetically first."""

    loaded_versions: int = _bounded(1, minimum=0, maximum=1000)
    """How many of each model's newest versions to load and serve; 0 = every version."""

    provider: str = _choice("auto", PROVIDERS)
    """onnxruntime execution provider: `cuda`, `cpu`, or `auto` (CUDA when available, else CPU)."""

    intra_op_threads: int = _bounded(0, minimum=0, maximum=1024)
    """Threads onnxruntime uses inside one operator; 0 = onnxruntime's default (one per core)."""

    inter_op_threads: int = _bounded(1, minimum=0, maximum=1024)
    """Threads onnxruntime uses to run independent operators in parallel; 0 = onnxruntime's default."""

    batching: str = _choice("continuous", BATCHING_POLICIES)
    """How requests share decoder steps: `continuous` (join and leave at every step), `request`
    (a batch of whole requests runs to completion), `none` (one request at a time)."""

    max_active_hypotheses: int = _bounded(256, minimum=1, maximum=1_000_000)
    """Most hypotheses (decoder rows: beam width x requests) in one decoder step, per model version."""

    max_padded_source_tokens: int = _bounded(16384, minimum=1, maximum=100_000_000)
    """Most padded source tokens (rows x the longest source, rounded up to `source_bucket_tokens`) in one
    decoder step, per model version."""

    source_bucket_tokens: int = _bounded(8, minimum=1, maximum=4096)
    """The decoder's memory is padded to a multiple of this many source tokens, so its layout changes only
    when the longest source in the batch crosses a multiple (1 = pad to the longest source exactly)."""

    max_waiting_requests: int = _bounded(1024, minimum=1, maximum=10_000_000)
    """Most texts queued per model version before new ones are refused with RESOURCE_EXHAUSTED."""

    batch_size: int = _bounded(32, minimum=1, maximum=100_000)
    """Most requests in one batch for `--batching request`."""

    batch_delay_ms: float = _bounded(2.0, minimum=0.0, maximum=60_000.0)
    """Milliseconds `--batching request` waits for more requests before starting a batch that is not full."""

    max_texts_per_request: int = _bounded(64, minimum=1, maximum=100_000)
    """Most texts in one Translate call."""

    max_text_bytes: int = _bounded(16384, minimum=1, maximum=64 * 1024 * 1024)
    """Largest text, in UTF-8 bytes."""

    max_receive_message_bytes: int = _bounded(4 * 1024 * 1024, minimum=1024, maximum=2**31 - 1)
    """Largest gRPC request message the server accepts, in bytes."""

    max_send_message_bytes: int = _bounded(16 * 1024 * 1024, minimum=1024, maximum=2**31 - 1)
    """Largest gRPC response message the server sends, in bytes (attention matrices can be large)."""

    max_beam_size: int = _bounded(8, minimum=1, maximum=4096)
    """Widest beam a request may ask for; a model's top_k lowers it further for that model."""

    default_max_length: int = _bounded(0, minimum=0, maximum=1_000_000)
    """Generated-token limit when a request sets none; 0 = the model's max_target_tokens."""

    drain_grace_seconds: float = _bounded(30.0, minimum=0.0, maximum=3600.0)
    """Seconds in-flight calls get to finish after SIGTERM/SIGINT before they are cancelled."""

    drain_delay_seconds: float = _bounded(1.0, minimum=0.0, maximum=600.0)
    """Seconds, at the start of a drain, between health turning NOT_SERVING (new translations get UNAVAILABLE)
    and the server closing its connections, so that balancing clients watching health stop sending here
    first; taken out of drain_grace_seconds."""

    log_level: str = _choice("INFO", LOG_LEVELS)
    """Python logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL."""

    repository_poll_seconds: float = _bounded(5.0, minimum=0.0, maximum=86400.0)
    """Seconds between scans of the model repository for new, changed or removed versions (hot reload:
    a new version is loaded, warmed up and switched to while the old one drains); 0 = scan only at start."""

    tls_cert_file: Path | None = _optional_path()
    """PEM certificate chain the gRPC port presents; with tls_key_file set too, the port speaks TLS only.
    Unset = plaintext."""

    tls_key_file: Path | None = _optional_path()
    """PEM private key of tls_cert_file."""

    tls_client_ca_file: Path | None = _optional_path()
    """PEM CA certificates; when set, every client must present a certificate they signed (mutual TLS).
    Needs tls_cert_file and tls_key_file."""

    auth_tokens_file: Path | None = _optional_path()
    """File of accepted bearer tokens, one per line ('#' starts a comment; re-read when it changes).
    With tokens configured, every call but health checks needs the metadata `authorization: Bearer TOKEN`."""

    auth_tokens: str = _secret()
    """Accepted bearer tokens, comma-separated, from the ATTNSERVE_AUTH_TOKENS environment variable only
    (there is no flag, so tokens never appear in the process table); added to those of auth_tokens_file."""

    reflection: bool = True
    """Serve gRPC server reflection (lets grpcurl and similar tools list the API): true or false."""

    max_concurrent_streams: int = _bounded(0, minimum=0, maximum=2**31 - 1)
    """Most calls one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS);
    0 = no limit. Calls beyond it are refused before they reach the server (UNAVAILABLE, REFUSED_STREAM:
    nothing was done, so they are safe to retry), so one client cannot hold more than this many."""

    max_pending_calls: int = _bounded(10_000, minimum=1, maximum=1_000_000)
    """Calls gRPC core holds before the server's Python layer picks them up; twice this is the hard limit,
    beyond which gRPC core fails calls with CANCELLED. Each costs a few KB while it waits."""

    max_connection_age_seconds: float = _bounded(0.0, minimum=0.0, maximum=86400.0)
    """Seconds after which the server asks a client connection to close (HTTP/2 GOAWAY; calls in flight
    get drain_grace_seconds to finish), so clients balancing with `dns:///` re-resolve and find new
    replicas; 0 = connections never age out."""

    def __post_init__(self) -> None:
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            problem = _field_problem(setting, value)
            if problem is not None:
                raise SettingsError(f"{setting.name}={_show(value, setting)}: {problem}")
        problem = _cross_field_problem(self)
        if problem is not None:
            raise SettingsError(problem)

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from command-line flags over `ATTNSERVE_*` variables over the defaults.

        `argv` excludes the program name (None = sys.argv[1:]); `environ` None = os.environ.
        Raises SettingsError for a bad value; argparse exits (status 2) on an unknown flag.
        """
        environ = os.environ if environ is None else environ
        flags = vars(build_parser().parse_args(argv))
        values: dict[str, Any] = {}
        for setting in dataclasses.fields(cls):
            env_name = ENV_PREFIX + setting.name.upper()
            if flags.get(setting.name) is not None:
                origin, raw = f"--{_flag(setting.name)}", flags[setting.name]
            elif env_name in environ:
                origin, raw = env_name, environ[env_name]
            else:
                continue
            value = _convert(setting, raw, origin)
            problem = _field_problem(setting, value)
            if problem is not None:
                raise SettingsError(f"{origin}={_show(raw, setting)}: {problem}")
            values[setting.name] = value
        return cls(**values)

    @property
    def grpc_address(self) -> str:
        """`host:port` for grpc's add_insecure_port."""
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        """The host without IPv6 brackets, as http.server wants it."""
        return self.host.strip("[]")


def build_parser(prog: str = "attnserve serve") -> argparse.ArgumentParser:
    """The flags of `attnserve serve`: one per setting, each defaulting to None (= not given)."""
    docs = _field_docs()
    environment_only = [setting for setting in dataclasses.fields(Settings) if setting.metadata.get("environment_only")]
    epilog = " ".join(
        f"{ENV_PREFIX}{setting.name.upper()} (environment only): {docs.get(setting.name, '')}"
        for setting in environment_only
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the models of a model repository over gRPC. Every flag can also be set with "
        f"an {ENV_PREFIX}<FLAG_NAME> environment variable (flags win).",
        epilog=epilog.replace("%", "%%") or None,
        # No prefixes: `--auth-tokens SECRET` must fail, not quietly become --auth-tokens-file=SECRET.
        allow_abbrev=False,
    )
    for setting in dataclasses.fields(Settings):
        if setting.metadata.get("environment_only"):
            continue
        help_text = docs.get(setting.name, "")
        help_text = f"{help_text} [env {ENV_PREFIX}{setting.name.upper()}; default: {_show(setting.default)}]"
        help_text = help_text.replace("%", "%%")
        parser.add_argument(
            f"--{_flag(setting.name)}", dest=setting.name, default=None, metavar=_metavar(setting), help=help_text
        )
    return parser


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _metavar(setting: dataclasses.Field[Any]) -> str:
    choices = setting.metadata.get("choices")
    if choices:
        return "{" + ",".join(choices) + "}"
    kind = _kind(setting)
    return {int: "N", float: "X", Path: "PATH", bool: "{true,false}"}.get(kind, "TEXT")


def _kind(setting: dataclasses.Field[Any]) -> type:
    # Annotations are strings under `from __future__ import annotations`; the default's type is exact,
    # except for optional fields (default None), which name their kind in the metadata.
    declared = setting.metadata.get("kind")
    if declared is not None:
        return declared
    return Path if isinstance(setting.default, Path) else type(setting.default)


def _show(value: Any, setting: dataclasses.Field[Any] | None = None) -> str:
    if setting is not None and setting.metadata.get("secret"):
        return "(hidden)"
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def _convert(setting: dataclasses.Field[Any], raw: Any, origin: str) -> Any:
    """Parse the text of a flag or environment variable into the field's type."""
    kind = _kind(setting)
    text = str(raw).strip()
    try:
        if kind is int:
            return int(text)
        if kind is float:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError
            return number
    except ValueError:
        noun = "an integer" if kind is int else "a finite number"
        raise SettingsError(f"{origin}={_show(raw)}: {setting.name} must be {noun}") from None
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise SettingsError(f"{origin}={_show(raw)}: {setting.name} must be true or false")
    if kind is Path:
        if not text and setting.metadata.get("optional"):
            return None
        return Path(text)
    if setting.name == "log_level":
        return text.upper()
    if setting.metadata.get("choices"):
        return text.lower()
    return text


def _field_problem(setting: dataclasses.Field[Any], value: Any) -> str | None:
    """What is wrong with one field's value, or None; the message names the field and its bound."""
    name = setting.name
    kind = _kind(setting)
    if kind is Path:
        if value is None and setting.metadata.get("optional"):
            return None
        if not isinstance(value, Path) or not str(value):
            return f"{name} must be a {'file' if setting.metadata.get('optional') else 'folder'} path"
        return None
    if kind is bool:
        return None if isinstance(value, bool) else f"{name} must be true or false"
    if kind in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not isinstance(value, int))
        ):
            return f"{name} must be {'an integer' if kind is int else 'a number'}"
        if kind is float and not math.isfinite(value):
            return f"{name} must be a finite number"
        minimum, maximum = setting.metadata.get("minimum"), setting.metadata.get("maximum")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            return f"{name} must be {minimum}..{maximum}"
        return None
    if not isinstance(value, str):
        return f"{name} must be text"
    choices = setting.metadata.get("choices")
    if choices and value not in choices:
        return f"{name} must be one of {', '.join(choices)}"
    if name == "host" and not value:
        return "host must not be empty"
    if name == "default_model" and value and ("/" in value or "\\" in value or value in (".", "..")):
        return "default_model must be a model name, not a path"
    return None


def _cross_field_problem(settings: Settings) -> str | None:
    if settings.metrics_port and settings.metrics_port == settings.port:
        return (
            f"metrics_port={settings.metrics_port} and port={settings.port} must differ "
            "(or metrics_port=0 to turn metrics off)"
        )
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        return (
            f"tls_cert_file={_show(settings.tls_cert_file)} and tls_key_file={_show(settings.tls_key_file)}: "
            "set both (TLS) or neither (plaintext)"
        )
    if settings.tls_client_ca_file is not None and settings.tls_cert_file is None:
        return (
            f"tls_client_ca_file={settings.tls_client_ca_file} needs tls_cert_file and tls_key_file: "
            "mutual TLS is TLS with client certificates"
        )
    return None


@cache
def _field_docs() -> dict[str, str]:
    """The attribute docstrings of Settings (the string under each field), used as flag help."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(Settings)))
    except (OSError, TypeError):  # no source available (e.g. a zipped install): help without prose
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs

"""The server's one typed settings object, built once in `attnserve serve` and passed down.

Every field can be set by a command-line flag (`--model-repository`, `--port`, ...) or by an
`ATTNSERVE_<FIELD>` environment variable (`ATTNSERVE_PORT=50052`); a flag wins over the environment,
which wins over the default. Secrets (`auth_tokens`) come from the environment only and are never shown.

The fields, their bounds and their help are one pydantic-settings class: pydantic does the conversion and the
checks, pydantic-settings reads the `ATTNSERVE_` variables. Written here: the flags, with argparse rather than
pydantic-settings' CLI source, so that `--help` names each flag's variable and default and the secret gets no
flag at all; and a message in our words that names where a bad value came from, the value and the bound:
`ATTNSERVE_PORT=70000: port must be 1..65535`.
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from service.engine.core import BatchingPolicy, EngineLimits
from service.event_loop import EventLoopChoice, uvloop_installed
from service.runtime.allocator import AllocatorChoice, jemalloc_library
from service.runtime.model import usable_cpus
from service.runtime.providers import Provider
from service.validation import error_text

ENV_PREFIX = "ATTNSERVE_"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _unset_when_empty(value: Any) -> Any:
    # An empty flag or variable (`ATTNSERVE_TLS_CERT_FILE=`) means "not set", as it does for most servers.
    return None if isinstance(value, str) and not value.strip() else value


def _not_empty_host(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _model_name(value: str) -> str:
    if value and ("/" in value or "\\" in value or value in (".", "..")):
        raise ValueError("must be a model name, not a path")
    return value


MAX_FRONTENDS = 64


def _frontends(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) <= MAX_FRONTENDS):
        raise ValueError(f"must be auto or 0..{MAX_FRONTENDS}")
    return value if value == "auto" else str(int(value))


OptionalFile = Annotated[Path | None, BeforeValidator(_unset_when_empty)]


class Settings(BaseSettings):
    """Everything `attnserve serve` can be told, with its unit and bounds."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,  # pydantic-settings then looks names up lower-cased; see _Environment
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,  # the string under each field is its description and its flag's help
        validate_default=True,
    )

    model_repository: Path = Path("models")
    """Folder holding the model repository (`<name>/<version>/model.json`, see docs/model-format.md)."""

    host: Annotated[str, AfterValidator(_not_empty_host)] = "0.0.0.0"
    """Address the gRPC server, the HTTP server and the metrics endpoint listen on, e.g. `0.0.0.0`, `127.0.0.1`,
    `[::]`."""

    port: Annotated[int, Field(ge=1, le=65535)] = 50051
    """TCP port of the gRPC server (Translator, KServe v2 GRPCInferenceService, Health and Reflection services)."""

    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 8002
    """TCP port of the Prometheus endpoint (`/metrics`); 0 turns it off."""

    http_port: Annotated[int, Field(ge=0, le=65535)] = 8000
    """TCP port of the HTTP server (KServe v2 REST, the JSON API with server-sent events, the page at `/`,
    `/openapi.json`); 0 turns it off. Same models, limits, TLS and bearer tokens as the gRPC port."""

    http_body_timeout_seconds: Annotated[float, Field(ge=0.01, le=3600.0, allow_inf_nan=False)] = 30.0
    """Seconds an HTTP client may take to send a request body; a slower one is answered 408 and its
    connection closed, so a client that never finishes its body holds nothing for long."""

    default_model: Annotated[str, AfterValidator(_model_name)] = ""
    """Model used when a request names none; empty = the only model, else the alphabetically first."""

    loaded_versions: Annotated[int, Field(ge=0, le=1000)] = 1
    """How many of each model's newest versions to load and serve; 0 = every version."""

    provider: Annotated[Provider, BeforeValidator(_lower)] = "auto"
    """onnxruntime execution provider: `cuda`, `cpu`, or `auto` (CUDA when available, else CPU)."""

    intra_op_threads: Annotated[int, Field(ge=0, le=1024)] = 0
    """Threads onnxruntime uses inside one operator; 0 = chosen per model: 1 on a GPU and for small models
    (a decoder graph under 16 MiB), half the usable CPUs (at most 4) for larger ones."""

    inter_op_threads: Annotated[int, Field(ge=0, le=1024)] = 1
    """Threads onnxruntime uses to run independent operators in parallel; 0 = onnxruntime's default."""

    onnx_spinning: bool = False
    """Let onnxruntime's threads spin between runs (session.intra_op.allow_spinning). Off by default: the
    engine runs a step every few hundred microseconds, so spinning threads never sleep and take a core."""

    cuda_tf32: bool = False
    """On the CUDA provider, let matrix multiplies use TF32 (inputs rounded to 10 bits of mantissa). Off by
    default: in float32 the GPU's outputs stay within rounding of the CPU's. docs/gpu.md has what TF32 changed
    on an H100 (far less speed than accuracy)."""

    encoder_overlap: Annotated[Literal["auto", "on", "off"], BeforeValidator(_lower)] = "auto"
    """Run the encoder for requests that join a running batch on a thread of its own, beside the decoder step
    (they join after it): `auto` = on the CPU for models with a decoder graph of 16 MiB or more when the usable
    CPUs are at least twice the intra-op threads, where the encoder call costs a good part of a step; `on`;
    `off` (encode at the start of the step, in the stepping thread)."""

    engine_steps_on_loop: bool = False
    """In the engine process of `frontends` N >= 1: step the engines on its event loop, between reading the
    front-ends' messages, instead of on a worker thread each. No thread hop per step, so less CPU per call for
    models whose steps cost little; but a step holds up the process's messages, so models with costly steps lose
    throughput (the phrasebook model served 246 calls/s against 420 on threads). Off by default."""

    event_loop: Annotated[EventLoopChoice, BeforeValidator(_lower)] = "auto"
    """The asyncio event loop of the server's processes: `auto` = uvloop's (libuv's, in C) for the processes that
    serve RPCs (one process, the front-ends: 14-21% more calls/s at 64 in flight on two cores) and asyncio's own
    for the engine process of `frontends` N, where uvloop measured slower (docs/benchmarks.md); `uvloop` or
    `asyncio` = that loop in every process. Without uvloop installed (Windows), auto is asyncio's loop."""

    batching: Annotated[BatchingPolicy, BeforeValidator(_lower)] = BatchingPolicy.CONTINUOUS
    """How requests share decoder steps: `continuous` (join and leave at every step), `request`
    (a batch of whole requests runs to completion), `none` (one request at a time)."""

    max_active_hypotheses: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    """Most hypotheses (decoder rows: beam width x requests) in one decoder step, per model version."""

    max_padded_source_tokens: Annotated[int, Field(ge=1, le=100_000_000)] = 16384
    """Most padded source tokens (rows x the longest source, rounded up to `source_bucket_tokens`) in one
    decoder step, per model version."""

    source_bucket_tokens: Annotated[int, Field(ge=1, le=4096)] = 8
    """The decoder's memory is padded to a multiple of this many source tokens, so its layout changes only
    when the longest source in the batch crosses a multiple (1 = pad to the longest source exactly)."""

    max_waiting_requests: Annotated[int, Field(ge=1, le=10_000_000)] = 1024
    """Most texts queued per model version before new ones are refused with RESOURCE_EXHAUSTED."""

    max_queue_wait_ms: Annotated[float, Field(ge=0.0, le=3_600_000.0, allow_inf_nan=False)] = 500.0
    """Milliseconds a call may expect to wait in a model version's queue: a call that could not start within it
    (the texts ahead of it over the rate the queue has been draining) is refused at once with RESOURCE_EXHAUSTED
    and a retry hint, before it is tokenized; 0 = no bound but max_waiting_requests."""

    max_active_calls: Annotated[int, Field(ge=0, le=1_000_000)] = 64
    """Most translation calls this process has in its engines at once; the others wait their turn, in one line per
    client connection, new lines first and then the others round-robin, so a client with many calls in flight
    waits behind its own and not others behind it. Few calls in progress also keep the event loop's turns short,
    so calls leave gRPC core's backlog, where they wait in arrival order, about as soon as they come. A client's
    first waiting call is refused (RESOURCE_EXHAUSTED) when the new lines ahead would keep it waiting longer than
    max_queue_wait_ms. Token streams do not count. 0 = no limit."""

    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 32
    """Most requests in one batch for `--batching request`."""

    batch_delay_ms: Annotated[float, Field(ge=0.0, le=60_000.0, allow_inf_nan=False)] = 2.0
    """Milliseconds `--batching request` waits for more requests before starting a batch that is not full."""

    max_texts_per_request: Annotated[int, Field(ge=1, le=100_000)] = 64
    """Most texts in one Translate call."""

    max_text_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 16384
    """Largest text, in UTF-8 bytes."""

    max_receive_message_bytes: Annotated[int, Field(ge=1024, le=2**31 - 1)] = 4 * 1024 * 1024
    """Largest gRPC request message, and HTTP request body, the server accepts, in bytes (HTTP: 413 beyond)."""

    max_send_message_bytes: Annotated[int, Field(ge=1024, le=2**31 - 1)] = 16 * 1024 * 1024
    """Largest gRPC response message the server sends, in bytes (attention matrices can be large)."""

    max_beam_size: Annotated[int, Field(ge=1, le=4096)] = 8
    """Widest beam a request may ask for; a model's top_k lowers it further for that model."""

    default_max_length: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """Generated-token limit when a request sets none; 0 = the model's max_target_tokens."""

    drain_grace_seconds: Annotated[float, Field(ge=0.0, le=3600.0, allow_inf_nan=False)] = 30.0
    """Seconds in-flight calls get to finish after SIGTERM/SIGINT before they are cancelled."""

    drain_delay_seconds: Annotated[float, Field(ge=0.0, le=600.0, allow_inf_nan=False)] = 1.0
    """Seconds, at the start of a drain, between health turning NOT_SERVING (new translations get UNAVAILABLE)
    and the server closing its connections, so that balancing clients watching health stop sending here
    first; taken out of drain_grace_seconds."""

    memory_return_seconds: Annotated[float, Field(ge=0.0, le=86400.0, allow_inf_nan=False)] = 10.0
    """Seconds between returns to the OS of the memory each process holds but no longer uses (onnxruntime's arenas
    shrink at their next run, the engines' batches give back tables beyond their rows, glibc's heap is trimmed), so
    that RSS follows what the load needs now rather than the most it ever needed; 0 = never."""

    memory_allocator: Annotated[AllocatorChoice, BeforeValidator(_lower)] = "auto"
    """The malloc of the server's processes: `auto` = jemalloc where it is installed (Debian: libjemalloc2; the
    images have it), else the C library's; `jemalloc` or `system` = that one. jemalloc gives back the pages a
    burst or a hot reload used once they are free, where glibc kept some for minutes (docs/reliability.md). The
    server starts itself again, under the same pid, with the library preloaded (LD_PRELOAD)."""

    log_level: Annotated[LogLevel, BeforeValidator(_upper)] = "INFO"
    """Python logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL."""

    repository_poll_seconds: Annotated[float, Field(ge=0.0, le=86400.0, allow_inf_nan=False)] = 5.0
    """Seconds between scans of the model repository for new, changed or removed versions (hot reload:
    a new version is loaded, warmed up and switched to while the old one drains); 0 = scan only at start."""

    tls_cert_file: OptionalFile = None
    """PEM certificate chain the gRPC port presents; with tls_key_file set too, the port speaks TLS only.
    Unset = plaintext."""

    tls_key_file: OptionalFile = None
    """PEM private key of tls_cert_file."""

    tls_client_ca_file: OptionalFile = None
    """PEM CA certificates; when set, every client must present a certificate they signed (mutual TLS).
    Needs tls_cert_file and tls_key_file."""

    auth_tokens_file: OptionalFile = None
    """File of accepted bearer tokens, one per line ('#' starts a comment; re-read when it changes).
    With tokens configured, every call but health checks needs the metadata `authorization: Bearer TOKEN`."""

    auth_tokens: SecretStr = SecretStr("")
    """Accepted bearer tokens, comma-separated, from the ATTNSERVE_AUTH_TOKENS environment variable only
    (there is no flag, so tokens never appear in the process table); added to those of auth_tokens_file."""

    reflection: bool = True
    """Serve gRPC server reflection (lets grpcurl and similar tools list the API): true or false."""

    onnxruntime_telemetry: bool = False
    """Let onnxruntime collect and send its usage telemetry (its Linux wheels do by default, and keep a device id
    under $HOME/.cache): true or false. false sets ORT_DISABLE_TELEMETRY=1 for the server and every
    process it starts; true leaves onnxruntime's own default."""

    max_concurrent_streams: Annotated[int, Field(ge=0, le=2**31 - 1)] = 1000
    """Most calls one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS);
    0 = no limit. Calls beyond it are refused by the transport (REFUSED_STREAM, seen as UNAVAILABLE: nothing
    was done, safe to retry), also those of a client that bursts past it on a connection too new to know the
    limit; clients that know it queue on their side. Set with this times the client connections below
    max_pending_calls, no call can reach the backlog limit where gRPC core fails calls with CANCELLED. It is also
    what bounds a client that opens and resets streams in a loop: gRPC core refuses new streams while this many
    of the connection's are still allocated (without a limit such a client filled core's backlog until it failed
    other clients' calls with CANCELLED). 1000 by default: far more than a client holds on one connection, and
    reached only by one that bursts 1000 calls before the server's settings reach it."""

    max_pending_calls: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    """Calls gRPC core holds before the server's Python layer picks them up; twice this is the hard limit,
    beyond which gRPC core fails calls with CANCELLED. Each costs a few KB while it waits."""

    max_connection_age_seconds: Annotated[float, Field(ge=0.0, le=86400.0, allow_inf_nan=False)] = 0.0
    """Seconds after which the server asks a client connection to close (HTTP/2 GOAWAY; calls in flight
    get drain_grace_seconds to finish), so clients balancing with `dns:///` re-resolve and find new
    replicas; 0 = connections never age out."""

    frontends: Annotated[str, BeforeValidator(_lower), AfterValidator(_frontends)] = "auto"
    """gRPC front-end processes: N >= 1 runs N processes sharing the port (validation, tokenizing, the RPC
    work) in front of one engine process that decodes; 0 runs everything in one process. auto: 0 with
    fewer than 3 usable CPUs (see `cpus`), else one per usable CPU but one (at most 8)."""

    cpus: Annotated[int, Field(ge=0, le=4096)] = 0
    """CPUs the server may use, for what is chosen from them (front-end processes, onnxruntime threads);
    0 = counted: the CPU affinity, lowered by a cgroup CPU limit (a Kubernetes CPU limit). Set it from the
    CPU request where there is no limit (a pod would otherwise count every core of its node)."""

    def __init__(self, **values: Any) -> None:
        # Built in code (tests, `attnserve translate --offline`, the acceptance check) the settings are exactly
        # what the code says: nothing is read from the environment here; `from_sources` is the one place that
        # reads flags and variables. pydantic's errors become one SettingsError in our words.
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(_problems(error), {name: (name, value) for name, value in values.items()}) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(
                f"metrics_port={self.metrics_port} and port={self.port} must differ "
                "(or metrics_port=0 to turn metrics off)"
            )
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise ValueError(
                f"http_port={self.http_port} must differ from port={self.port} and metrics_port={self.metrics_port} "
                "(or http_port=0 to turn HTTP off)"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                f"tls_cert_file={_show(self.tls_cert_file)} and tls_key_file={_show(self.tls_key_file)}: "
                "set both (TLS) or neither (plaintext)"
            )
        if self.event_loop == "uvloop" and not uvloop_installed():
            raise ValueError(
                "event_loop=uvloop, but uvloop is not installed: pip install uvloop, or use auto or asyncio"
            )
        if self.memory_allocator == "jemalloc" and jemalloc_library() is None:
            raise ValueError(
                "memory_allocator=jemalloc, but jemalloc is not installed (Debian, Ubuntu: apt-get install "
                "libjemalloc2), or use auto or system"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                f"tls_client_ca_file={self.tls_client_ca_file} needs tls_cert_file and tls_key_file: "
                "mutual TLS is TLS with client certificates"
            )
        return self

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from command-line flags over `ATTNSERVE_*` variables over the defaults.

        `argv` excludes the program name (None = sys.argv[1:]); `environ` None = os.environ.
        Raises SettingsError for a bad value; argparse exits (status 2) on an unknown flag.
        """
        flags = {name: raw.strip() for name, raw in vars(build_parser().parse_args(argv)).items() if raw is not None}
        variables = {
            name: raw.strip() if isinstance(raw, str) else raw
            for name, raw in _Environment(cls, os.environ if environ is None else environ)().items()
        }
        origins = {name: (f"{ENV_PREFIX}{name.upper()}", raw) for name, raw in variables.items()}
        origins.update({name: (f"--{_flag(name)}", raw) for name, raw in flags.items()})
        try:
            return cls(**{**variables, **flags})
        except SettingsError as error:
            raise SettingsError(error.problems, origins) from None

    def engine_limits(self) -> EngineLimits:
        """The engine's budgets for each model version, from these settings (their one source)."""
        return EngineLimits(
            max_active_hypotheses=self.max_active_hypotheses,
            max_padded_source_tokens=self.max_padded_source_tokens,
            max_waiting_requests=self.max_waiting_requests,
            batch_size=self.batch_size,
            batch_delay_s=self.batch_delay_ms / 1000.0,
            source_bucket=self.source_bucket_tokens,
        )

    @property
    def frontend_processes(self) -> int:
        """`frontends` with auto resolved for this process's CPUs (0 = one process for everything)."""
        if self.frontends != "auto":
            return int(self.frontends)
        cpus = self.usable_cpus
        return 0 if cpus < 3 else min(cpus - 1, 8)

    @property
    def usable_cpus(self) -> int:
        """`cpus`, or when 0 the CPUs this process may use (usable_cpus())."""
        return self.cpus or usable_cpus()

    @property
    def grpc_address(self) -> str:
        """`host:port` for grpc's add_insecure_port."""
        return f"{self.host}:{self.port}"

    @property
    def http_address(self) -> str:
        """The host without IPv6 brackets, as asyncio's create_server wants it."""
        return self.host.strip("[]")

    @property
    def metrics_address(self) -> str:
        """The host without IPv6 brackets, as http.server wants it."""
        return self.host.strip("[]")


class _Environment(EnvSettingsSource):
    """pydantic-settings' reading of the `ATTNSERVE_*` variables, from a given mapping rather than always
    os.environ (the library's dotenv source overrides the same method to read a file)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Only the names as documented (ATTNSERVE_PORT, not attnserve_port), lower-cased for the lookup.
        return {name.lower(): value for name, value in self._environ.items() if name.isupper()}


# ----- messages ---------------------------------------------------------------------------------------------


Problem = tuple[str | None, str]  # (the field, or None for a rule across fields; what is wrong)


class SettingsError(ValueError):
    """A setting has a bad value; the message says which, where it came from, the value and the bound."""

    def __init__(self, problems: list[Problem], origins: Mapping[str, tuple[str, Any]]) -> None:
        """`origins` maps a field to where its value came from (`--port`, `ATTNSERVE_PORT`, `port`) and the value
        as given there."""
        self.problems = problems
        lines = []
        for name, text in problems:
            if name is None:
                lines.append(text)
                continue
            where, given = origins.get(name, (name, None))
            lines.append(f"{where}={_show(given, name)}: {text}")
        super().__init__("; ".join(lines))


def _problems(error: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for detail in error.errors():
        name = str(detail["loc"][0]) if detail["loc"] else None
        if name is None:
            problems.append((None, error_text(detail)))
            continue
        if name not in Settings.model_fields:
            problems.append((None, f"{name} is not a setting"))
            continue
        problems.append((name, f"{name} {_what_is_wrong(detail, Settings.model_fields[name])}"))
    return problems


def _what_is_wrong(detail: ErrorDetails, setting: FieldInfo) -> str:
    kind = detail["type"]
    if kind in ("greater_than_equal", "less_than_equal"):
        low = next(m.ge for m in setting.metadata if hasattr(m, "ge"))
        high = next(m.le for m in setting.metadata if hasattr(m, "le"))
        return f"must be {low}..{high}"
    if kind.startswith("int_"):
        return "must be an integer"
    if kind.startswith("float_") or kind == "finite_number":
        return "must be a finite number"
    if kind.startswith("bool_"):
        return "must be true or false"
    if kind in ("literal_error", "enum"):
        return f"must be one of {', '.join(_choices(setting))}"
    if kind.startswith("path_"):
        return "must be a path"
    if kind == "string_type":
        return "must be text"
    return error_text(detail)


def _show(value: Any, name: str | None = None) -> str:
    if isinstance(value, SecretStr) or name in SECRET_FIELDS:
        return "(hidden)"
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


# ----- flags ------------------------------------------------------------------------------------------------


# Secrets are set from the environment only (the process table shows flags) and never shown.
SECRET_FIELDS = frozenset(name for name, setting in Settings.model_fields.items() if setting.annotation is SecretStr)


def build_parser(prog: str = "attnserve serve") -> argparse.ArgumentParser:
    """The flags of `attnserve serve`: one per setting but the secrets, each defaulting to None (= not given)."""
    fields = Settings.model_fields
    epilog = " ".join(
        f"{ENV_PREFIX}{name.upper()} (environment only): {_help(fields[name])}" for name in sorted(SECRET_FIELDS)
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the models of a model repository over gRPC. Every flag can also be set with "
        f"an {ENV_PREFIX}<FLAG_NAME> environment variable (flags win).",
        epilog=epilog.replace("%", "%%") or None,
        # No prefixes: `--auth-tokens SECRET` must fail, not quietly become --auth-tokens-file=SECRET.
        allow_abbrev=False,
    )
    for name, setting in fields.items():
        if name in SECRET_FIELDS:
            continue
        help_text = f"{_help(setting)} [env {ENV_PREFIX}{name.upper()}; default: {_show(setting.default)}]"
        parser.add_argument(
            f"--{_flag(name)}", dest=name, default=None, metavar=_metavar(setting), help=help_text.replace("%", "%%")
        )
    return parser


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _help(setting: FieldInfo) -> str:
    return " ".join((setting.description or "").split())


def _choices(setting: FieldInfo) -> tuple[Any, ...]:
    """The values a Literal or enum setting takes (() for any other)."""
    annotation = setting.annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(member.value for member in annotation)
    return get_args(annotation)


def _metavar(setting: FieldInfo) -> str:
    choices = _choices(setting)
    if choices and all(isinstance(choice, str) for choice in choices):
        return "{" + ",".join(choices) + "}"
    if setting.annotation is bool:
        return "{true,false}"
    if setting.annotation is int:
        return "N"
    if setting.annotation is float:
        return "X"
    if setting.annotation in (Path, Path | None):
        return "PATH"
    return "TEXT"

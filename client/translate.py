"""`attnserve translate`: translate text with a running server, or offline with a local model.

    attnserve translate "samedi 21 novembre 2026"                       # server at localhost:50051
    attnserve translate --server host:50051 --model numbers --beam 4 --n-best 3 "4321"
    attnserve translate --plot alignment.png "samedi 21 novembre 2026"  # also draw the attention
    attnserve translate --offline models/dates "samedi 21 novembre 2026"  # no server

Offline mode builds the same engine client and Dataplane a one-process server uses, in-process
(onnxruntime, no torch), so its output is what the server would answer. Exit status: 0 ok, 1 the translation
failed (the status code is printed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

from service.gen.attnserve.v1 import translator_pb2 as pb
from service.runtime.providers import PROVIDERS

DEFAULT_SERVER = "localhost:50051"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnserve translate",
        description="Translate texts with an attnserve server (or a local model with --offline).",
    )
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="text(s) to translate")
    parser.add_argument(
        "--server",
        default=os.environ.get("ATTNSERVE_SERVER", DEFAULT_SERVER),
        help=f"server address host:port [env ATTNSERVE_SERVER; default: {DEFAULT_SERVER}]",
    )
    parser.add_argument(
        "--offline",
        type=Path,
        metavar="PATH",
        help="decode locally instead: a model folder (models/dates), a version folder "
        "(models/dates/1) or a whole repository (models)",
    )
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument("--beam", type=int, default=0, metavar="N", help="beam size (default: greedy)")
    parser.add_argument("--n-best", type=int, default=0, metavar="N", help="print the N best hypotheses (<= beam)")
    parser.add_argument(
        "--max-length", type=int, default=0, metavar="N", help="most generated tokens (default: the model's)"
    )
    parser.add_argument(
        "--length-penalty", type=float, default=0.0, metavar="ALPHA", help="length normalisation alpha (default 0)"
    )
    parser.add_argument(
        "--replace-unknowns", action="store_true", help="replace unknown output tokens by the attended source piece"
    )
    parser.add_argument(
        "--stream", action="store_true", help="print tokens as they are decoded (one text; server mode)"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="IMAGE",
        help="draw the best hypothesis' attention heatmap to IMAGE (.png, .svg, .pdf); with several "
        "texts, IMAGE-1.png, IMAGE-2.png, ... (needs matplotlib: pip install 'attnserve[plot]')",
    )
    parser.add_argument("--json", action="store_true", help="print the whole response as JSON")
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="deadline of the call (default 30)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the system's certificate authorities (implied by --tls-ca-file)",
    )
    parser.add_argument(
        "--tls-ca-file",
        type=Path,
        metavar="PEM",
        default=_env_path("ATTNSERVE_TLS_CA_FILE"),
        help="trust the server certificates this CA signed [env ATTNSERVE_TLS_CA_FILE]",
    )
    parser.add_argument(
        "--tls-cert-file",
        type=Path,
        metavar="PEM",
        default=_env_path("ATTNSERVE_TLS_CLIENT_CERT_FILE"),
        help="client certificate for mutual TLS [env ATTNSERVE_TLS_CLIENT_CERT_FILE]",
    )
    parser.add_argument(
        "--tls-key-file",
        type=Path,
        metavar="PEM",
        default=_env_path("ATTNSERVE_TLS_CLIENT_KEY_FILE"),
        help="private key of --tls-cert-file [env ATTNSERVE_TLS_CLIENT_KEY_FILE]",
    )
    parser.add_argument(
        "--tls-server-name",
        default="",
        metavar="NAME",
        help="name to check the server certificate against (default: the host of --server)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="file whose first line is the bearer token to send (default: the ATTNSERVE_TOKEN "
        "environment variable, if set)",
    )
    parser.add_argument(
        "--provider",
        default="cpu",
        choices=PROVIDERS,
        help="onnxruntime execution provider for --offline (default cpu)",
    )
    return parser


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def _token(arguments: argparse.Namespace) -> str | None:
    """The bearer token: the first line of --token-file, else ATTNSERVE_TOKEN, else none."""
    if arguments.token_file is not None:
        try:
            lines = arguments.token_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise TranslateFailed(
                "INVALID_ARGUMENT", f"--token-file {arguments.token_file}: {error.strerror}"
            ) from None
        return lines[0].strip() if lines and lines[0].strip() else None
    return os.environ.get("ATTNSERVE_TOKEN", "").strip() or None


def _request(arguments: argparse.Namespace) -> pb.TranslateRequest:
    return pb.TranslateRequest(
        model=arguments.model,
        version=arguments.version,
        texts=arguments.texts,
        options=pb.DecodeOptions(
            beam_size=arguments.beam,
            num_hypotheses=arguments.n_best,
            max_length=arguments.max_length,
            length_penalty=arguments.length_penalty,
            return_attention=arguments.plot is not None or arguments.json,
            replace_unknowns=arguments.replace_unknowns,
        ),
    )


class TranslateFailed(Exception):
    """The call failed; `code` is the gRPC status name, the message its details."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ----- server mode ------------------------------------------------------------------------------------


def _translate_remote(arguments: argparse.Namespace, request: pb.TranslateRequest) -> tuple[pb.TranslateResponse, bool]:
    """The server's response, and whether tokens were already printed as they streamed in."""
    import grpc

    from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
    from service.grpc_api.security import SecurityConfigError, open_channel, token_metadata

    metadata = token_metadata(_token(arguments))
    try:
        channel = open_channel(
            arguments.server,
            tls=arguments.tls,
            ca_file=arguments.tls_ca_file,
            cert_file=arguments.tls_cert_file,
            key_file=arguments.tls_key_file,
            server_name=arguments.tls_server_name,
        )
    except SecurityConfigError as error:
        raise TranslateFailed("INVALID_ARGUMENT", str(error)) from None
    with channel:
        stub = pb_grpc.TranslatorStub(channel)
        try:
            if not arguments.stream:
                return stub.Translate(request, timeout=arguments.timeout, metadata=metadata), False
            return _stream(stub, request, arguments, metadata)
        except grpc.RpcError as error:
            raise TranslateFailed(error.code().name, error.details() or "") from None


def _stream(
    stub: object,
    request: pb.TranslateRequest,
    arguments: argparse.Namespace,
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[pb.TranslateResponse, bool]:
    """Print tokens as they arrive (unless --json); return the final message as a response, and whether
    any token was printed (a beam search streams none)."""
    final: pb.TranslateStreamResponse | None = None
    printed = False
    shown = ""
    for message in stub.TranslateStream(request, timeout=arguments.timeout, metadata=metadata):  # type: ignore[attr-defined]
        if message.final:
            final = message
        elif not arguments.json:
            # Print what the text gained, not the raw piece: word and sentencepiece pieces carry no spaces
            # (or carry U+2581) and only the detokenized text reads right.
            delta = message.text[len(shown) :] if message.text.startswith(shown) else "\n" + message.text
            print(delta, end="", flush=True)
            shown = message.text
            printed = True
    if final is None:
        raise TranslateFailed("UNKNOWN", "the stream ended without a final message")
    response = pb.TranslateResponse(
        model=final.model, version=final.version, translations=[pb.Translation(hypotheses=final.hypotheses)]
    )
    return response, printed


# ----- offline mode -----------------------------------------------------------------------------------


async def _translate_offline(arguments: argparse.Namespace, request: pb.TranslateRequest) -> pb.TranslateResponse:
    from service.dataplane import Dataplane
    from service.engine_client.in_process import InProcessClient
    from service.errors import AttnServeError
    from service.grpc_api.servicer import options_from_grpc, outcome_to_grpc
    from service.lifecycle import configure_onnxruntime_telemetry
    from service.models import describe_repository_path
    from service.settings import Settings

    repository, model, version = describe_repository_path(arguments.offline)
    model = request.model or model or ""
    version = request.version or version or ""
    settings = Settings(
        model_repository=repository,
        metrics_port=0,
        provider=arguments.provider,
        default_model=model,
        loaded_versions=0 if version else 1,
        max_texts_per_request=max(len(request.texts), 1),
        # One call with every text, queued at once: nothing else waits, so no bound on the queue or the wait.
        max_waiting_requests=max(len(request.texts), 1),
        max_queue_wait_ms=0.0,
    )
    configure_onnxruntime_telemetry(settings.onnxruntime_telemetry)
    client = InProcessClient(settings, only={model} if model else None)
    try:
        await client.start()
        outcome = await Dataplane(client, settings).translate(
            model, version, list(request.texts), options_from_grpc(request.options), deadline=None
        )
    except AttnServeError as error:
        raise TranslateFailed(error.code, error.message) from None
    finally:
        await client.stop(0.0)
    return outcome_to_grpc(outcome)


# ----- output -----------------------------------------------------------------------------------------


def attention_matrix(hypothesis: pb.Hypothesis) -> np.ndarray:
    """The hypothesis' attention as [len(target_tokens), len(source_tokens)]."""
    rows, columns = len(hypothesis.target_tokens), len(hypothesis.source_tokens)
    return np.asarray(hypothesis.attention, dtype=np.float32).reshape(rows, columns)


def format_response(texts: list[str], response: pb.TranslateResponse, n_best: int) -> str:
    """Human-readable lines: the translation and its score, or a numbered n-best list per text."""
    lines: list[str] = []
    single = len(texts) == 1 and n_best <= 1
    for source, translation in zip(texts, response.translations, strict=False):
        if single:
            best = translation.hypotheses[0]
            lines.append(f"{best.text}\t(score {best.score:.4f})")
            continue
        lines.append(source)
        for rank, hypothesis in enumerate(translation.hypotheses, start=1):
            lines.append(f"  {rank}. {hypothesis.text}\t(score {hypothesis.score:.4f})")
    return "\n".join(lines)


def _plot(arguments: argparse.Namespace, response: pb.TranslateResponse) -> list[Path]:
    from client.plot import plot_alignment

    written: list[Path] = []
    path: Path = arguments.plot
    for index, (source, translation) in enumerate(zip(arguments.texts, response.translations, strict=False), start=1):
        best = translation.hypotheses[0]
        target = path if len(arguments.texts) == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")
        title = f"{response.model} v{response.version}: {source} -> {best.text}"
        written.append(
            plot_alignment(best.source_tokens, best.target_tokens, attention_matrix(best), target, title=title)
        )
    return written


def main(argv: list[str] | None = None) -> int:
    """`attnserve translate ...`; returns the exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.stream and (arguments.offline is not None or len(arguments.texts) != 1):
        parser.error("--stream takes exactly one text and needs a server (not --offline)")
    if arguments.beam < 0 or arguments.n_best < 0 or arguments.max_length < 0:
        parser.error("--beam, --n-best and --max-length must be >= 0")
    if arguments.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Before the call, so nobody waits for a translation whose heatmap cannot be drawn.
        parser.error("--plot draws with matplotlib, which is not installed: pip install 'attnserve[plot]'")
    request = _request(arguments)
    streamed = False
    try:
        if arguments.offline is not None:
            response = asyncio.run(_translate_offline(arguments, request))
        else:
            response, streamed = _translate_remote(arguments, request)
    except TranslateFailed as error:
        print(f"attnserve translate: {error.code}: {error}", file=sys.stderr)
        return 1
    if arguments.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), ensure_ascii=False, indent=2))
    elif streamed:
        print(f"\t(score {response.translations[0].hypotheses[0].score:.4f})")  # ends the line of tokens
    else:
        print(format_response(arguments.texts, response, arguments.n_best))
    if arguments.plot is not None:
        for path in _plot(arguments, response):
            print(f"alignment heatmap written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

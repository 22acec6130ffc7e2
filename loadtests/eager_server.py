"""The PyTorch eager contender: what a user writes first, served with attnserve's gRPC API.

Each model is the trained checkpoint of a training run (`RUN/best.pt` and its tokenizers), decoded with the
model's own eager loop (`Seq2Seq.greedy`, on `--device`) one request at a time: requests queue on one worker thread, and
each text is decoded alone (batch 1). Beam search, which the training code does not have, is the plain
loop a user would add: the beam's rows decoded together, one request at a time. No ONNX, no batching, no
scheduler; torch uses `--threads` intra-op threads, the same number the onnxruntime contenders get.

    python -m loadtests.eager_server --model dates=runs/dates --model numbers=runs/numbers --port 50062

Needs the `train` extra (torch). Calls cancelled while waiting in the queue are dropped before decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from export.model import Seq2Seq
from export.train import load_checkpoint
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.lifecycle import stop_event
from service.runtime.tokenizers import BOS, EOS, EOS_PIECE, Tokenizer, load_tokenizer


@dataclass(frozen=True)
class EagerModel:
    """A trained checkpoint with its tokenizers, as the training run left them."""

    name: str
    model: Seq2Seq
    source: Tokenizer
    target: Tokenizer

    @classmethod
    def load(cls, name: str, run_dir: Path, device: str = "cpu") -> EagerModel:
        import json

        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        kind = run["tokenizer"]
        model, _ = load_checkpoint(run_dir / "best.pt")
        model.to(torch.device(device))
        return cls(
            name=name,
            model=model,
            source=load_tokenizer(kind, run_dir / "source.tokenizer.json"),
            target=load_tokenizer(kind, run_dir / "target.tokenizer.json"),
        )

    def source_ids(self, text: str) -> list[int]:
        ids = self.source.encode(text)[: self.model.config.max_source_len - 1]
        return ids + [EOS]

    def max_length(self, requested: int) -> int:
        limit = self.model.config.max_target_len
        return min(requested, limit) if requested > 0 else limit


@torch.no_grad()
def greedy_one(model: Seq2Seq, ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """The model's own eager greedy loop on one source; returns (tokens without eos, ended with eos)."""
    device = next(model.parameters()).device
    source = torch.tensor([ids], dtype=torch.long, device=device)
    lengths = torch.tensor([len(ids)], dtype=torch.long, device=device)
    outputs, attention = model.greedy(source, lengths, max_len=max_length)
    tokens = outputs[0]
    return tokens, attention[0].shape[0] > len(tokens)


@torch.no_grad()
def beam_one(model: Seq2Seq, ids: list[int], beam_size: int, max_length: int) -> tuple[list[int], bool]:
    """A plain eager beam search on one source (the beam's rows decoded together); best by log prob."""
    device = next(model.parameters()).device
    source = torch.tensor([ids], dtype=torch.long, device=device)
    lengths = torch.tensor([len(ids)], dtype=torch.long, device=device)
    encoded = model.encode(source, lengths)
    memory, keys, state = encoded.memory, encoded.keys, encoded.state
    tokens = torch.tensor([BOS], device=device)
    scores = torch.zeros(1, device=device)
    histories: list[list[int]] = [[]]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_length):
        rows = tokens.shape[0]
        log_probs, _, state = model.step(
            tokens,
            lengths.expand(rows),
            memory.expand(rows, -1, -1),
            None if keys is None else keys.expand(rows, -1, -1),
            state,
        )
        candidates = (scores.unsqueeze(1) + log_probs).reshape(-1)
        top_scores, top_index = candidates.topk(min(2 * beam_size, candidates.numel()))
        vocab = log_probs.shape[1]
        keep_rows, keep_tokens, keep_scores, keep_histories = [], [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist(), strict=False):
            row, token = divmod(index, vocab)
            if token == EOS:
                finished.append((score, histories[row]))
            else:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
                keep_histories.append(histories[row] + [token])
            if len(keep_rows) == beam_size:
                break
        if len(finished) >= beam_size or not keep_rows:
            break
        select = torch.tensor(keep_rows, device=device)
        state = {name: value.index_select(0, select) for name, value in state.items()}
        tokens = torch.tensor(keep_tokens, device=device)
        scores, histories = torch.tensor(keep_scores, device=device), keep_histories
    if finished:
        best = max(finished, key=lambda item: item[0])
        return best[1], True
    return histories[int(scores.argmax())], False


class EagerTranslator(pb_grpc.TranslatorServicer):
    """Translate on one worker thread, one text at a time."""

    def __init__(self, models: dict[str, EagerModel]) -> None:
        self.models = models
        self.default = sorted(models)[0]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eager")

    def _model(self, name: str) -> EagerModel:
        model = self.models.get(name or self.default)
        if model is None:
            raise KeyError(name)
        return model

    def _decode(self, model: EagerModel, text: str, options: pb.DecodeOptions) -> pb.Hypothesis:
        ids = model.source_ids(text)
        max_length = model.max_length(options.max_length)
        if options.beam_size > 1:
            tokens, ended = beam_one(model.model, ids, options.beam_size, max_length)
        else:
            tokens, ended = greedy_one(model.model, ids, max_length)
        pieces = [model.target.id_to_piece(token) for token in tokens] + ([EOS_PIECE] if ended else [])
        return pb.Hypothesis(
            text=model.target.decode(tokens),
            source_tokens=[model.source.id_to_piece(token) for token in ids[:-1]] + [EOS_PIECE],
            target_tokens=pieces,
        )

    async def Translate(self, request: pb.TranslateRequest, context: aio.ServicerContext) -> pb.TranslateResponse:
        try:
            model = self._model(request.model)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served")
        loop = asyncio.get_running_loop()
        translations = []
        for text in request.texts:
            # A call cancelled while queued cancels this future, and the worker never starts it.
            hypothesis = await loop.run_in_executor(self._worker, self._decode, model, text, request.options)
            translations.append(pb.Translation(hypotheses=[hypothesis]))
        return pb.TranslateResponse(model=model.name, version="eager", translations=translations)

    async def TranslateStream(
        self, request: pb.TranslateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        response = await self.Translate(request, context)
        best = response.translations[0].hypotheses[0]
        yield pb.TranslateStreamResponse(
            text=best.text, final=True, hypotheses=[best], model=response.model, version="eager"
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[self._info(name) for name in sorted(self.models)], default_model=self.default
        )

    async def GetModel(self, request: pb.GetModelRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        try:
            return self._info(self._model(request.name).name)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} is not served")
            raise  # abort() raises; this line only tells the type checker so

    def _info(self, name: str) -> pb.ModelInfo:
        config = self.models[name].model.config
        return pb.ModelInfo(
            name=name,
            version="eager",
            versions=["eager"],
            loaded_versions=["eager"],
            ready=True,
            attention=config.attention,
            provider="torch-eager",
            is_default=name == self.default,
            limits=pb.ModelLimits(
                max_source_tokens=config.max_source_len, max_target_tokens=config.max_target_len, top_k=config.top_k
            ),
        )


async def serve(models: dict[str, EagerModel], host: str, port: int) -> None:
    server = aio.server()
    pb_grpc.add_TranslatorServicer_to_server(EagerTranslator(models), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = stop_event()
    print(f"eager server listening on {host}:{bound} serving {', '.join(sorted(models))}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.eager_server", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=RUN_DIR",
        help="serve the checkpoint of a training run under NAME (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50062)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device (default cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    models = {}
    for entry in args.model:
        name, _, run_dir = entry.partition("=")
        if not name or not run_dir:
            parser.error(f"--model takes NAME=RUN_DIR, got {entry!r}")
        models[name] = EagerModel.load(name, Path(run_dir), args.device)
    asyncio.run(serve(models, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The native attnserve.v1.Translator servicer: protobuf <-> dataplane records, a few lines per RPC.

Errors are not handled here: `service.errors` exceptions propagate to `RpcInterceptor`, which maps
them to status codes. The gRPC deadline is passed down as a monotonic deadline, and a cancelled call
cancels its engine requests (the awaiting task is cancelled, and the dataplane cancels on the way out).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
from grpc import aio

from service.dataplane import (
    Dataplane,
    StreamUpdate,
    TextTranslation,
    TranslatedHypothesis,
    TranslateOutcome,
)
from service.engine.records import DecodeOptions
from service.errors import InvalidRequest
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.grpc_api.errors import note_model
from service.grpc_api.peers import turn_line
from service.registry import ModelDescription

# ----- converters -------------------------------------------------------------------------------------


def options_from_grpc(options: pb.DecodeOptions) -> DecodeOptions:
    """The request's DecodeOptions as the dataplane takes them (0 still means "default")."""
    return DecodeOptions(
        beam_size=options.beam_size,
        num_hypotheses=options.num_hypotheses,
        max_length=options.max_length,
        length_penalty=options.length_penalty,
        return_attention=options.return_attention,
        replace_unknowns=options.replace_unknowns,
    )


def deadline_from_context(context: aio.ServicerContext) -> float | None:
    """The call's deadline as time.monotonic() seconds, or None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def hypothesis_to_grpc(hypothesis: TranslatedHypothesis) -> pb.Hypothesis:
    message = pb.Hypothesis(
        text=hypothesis.text,
        score=hypothesis.score,
        source_tokens=hypothesis.source_tokens,
        target_tokens=hypothesis.target_tokens,
    )
    if hypothesis.attention is not None:
        message.attention.extend(np.asarray(hypothesis.attention, dtype=np.float32).ravel().tolist())
    return message


def hypotheses_to_grpc(hypotheses: Sequence[TranslatedHypothesis]) -> list[pb.Hypothesis]:
    return [hypothesis_to_grpc(hypothesis) for hypothesis in hypotheses]


def translation_to_grpc(translation: TextTranslation) -> pb.Translation:
    return pb.Translation(hypotheses=hypotheses_to_grpc(translation.hypotheses))


def outcome_to_grpc(outcome: TranslateOutcome) -> pb.TranslateResponse:
    return pb.TranslateResponse(
        model=outcome.model,
        version=str(outcome.version),
        translations=[translation_to_grpc(translation) for translation in outcome.translations],
    )


def update_to_grpc(update: StreamUpdate) -> pb.TranslateStreamResponse:
    return pb.TranslateStreamResponse(
        token=update.token,
        text=update.text,
        index=update.index,
        final=update.final,
        hypotheses=hypotheses_to_grpc(update.hypotheses),
        model=update.model,
        version=str(update.version),
    )


def model_to_grpc(model: ModelDescription) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=model.name,
        version=str(model.version),
        versions=[str(version) for version in model.versions],
        loaded_versions=[str(version) for version in model.loaded_versions],
        ready=model.ready,
        attention=model.attention,
        architecture=model.architecture,
        task=pb.Task(
            kind=model.task_kind,
            description=model.task_description,
            source_languages=model.source_languages,
            target_language=model.target_language,
        ),
        test_metrics=model.test_metrics,
        provider=model.provider,
        limits=pb.ModelLimits(
            max_source_tokens=model.max_source_tokens,
            max_target_tokens=model.max_target_tokens,
            top_k=model.top_k,
        ),
        is_default=model.is_default,
        load_seconds=model.load_seconds,
    )


# ----- the servicer -----------------------------------------------------------------------------------


class TranslatorServicer(pb_grpc.TranslatorServicer):
    """attnserve.v1.Translator on top of a Dataplane."""

    def __init__(self, dataplane: Dataplane) -> None:
        self.dataplane = dataplane

    async def Translate(self, request: pb.TranslateRequest, context: aio.ServicerContext) -> pb.TranslateResponse:
        outcome = await self.dataplane.translate(
            request.model,
            request.version,
            list(request.texts),
            options_from_grpc(request.options),
            deadline_from_context(context),
            on_resolved=note_model,
            client=turn_line(context),
        )
        return outcome_to_grpc(outcome)

    async def TranslateStream(
        self, request: pb.TranslateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        if len(request.texts) != 1:
            raise InvalidRequest(
                f"TranslateStream takes exactly one text, got {len(request.texts)}; use Translate for several"
            )
        updates = self.dataplane.translate_stream(
            request.model,
            request.version,
            request.texts[0],
            options_from_grpc(request.options),
            deadline_from_context(context),
            on_resolved=note_model,
        )
        try:
            async for update in updates:
                yield update_to_grpc(update)
        finally:
            await updates.aclose()  # cancels the engine request if the client left early

    async def ListModels(self, request: pb.ListModelsRequest, context: aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[model_to_grpc(model) for model in self.dataplane.list_models()],
            default_model=self.dataplane.default_model,
        )

    async def GetModel(self, request: pb.GetModelRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        model = self.dataplane.get_model(request.name, request.version)
        note_model(model.name, model.version)
        return model_to_grpc(model)

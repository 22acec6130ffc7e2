"""The dataplane: text in, text out, shared by every transport (native gRPC, KServe v2, offline client).

It validates user values (with client-facing messages that name the limit), tokenizes, submits ONE
engine request per text to the engine client (so texts batch with everyone else's), awaits them and
detokenizes. It knows nothing of gRPC, nor whether the engine runs in this process or in another: deadlines
are `time.monotonic()` seconds, errors are `service.errors` exceptions, results are the small records below.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.engine.records import DecodeOptions, EngineRequest, EngineResult, FinishReason, Hypothesis
from service.engine_client import EngineClient
from service.engine_client.admission import LONGEST_RETRY_HINT_S, QUEUE_SHARE_KEPT, PendingCalls
from service.engine_client.gate import FairGate
from service.errors import BACKLOG_WAIT, QUEUE_WAIT, InvalidRequest, Overloaded
from service.registry import ModelDescription, ServedVersion
from service.runtime.tokenizers import EOS, EOS_PIECE, UNK, Tokenizer
from service.settings import Settings

QUEUE_LOOK_INTERVAL_S = 0.01
"""Admission at pickup looks at the model queues at most this often (Dataplane.admit_pickup)."""

OnResolved = Callable[[str, int], None]
"""Called with (model name, version) as soon as a call's model is resolved (e.g. for metric labels)."""


@dataclass(frozen=True)
class TranslatedHypothesis:
    """One hypothesis as text.

    `source_tokens`: the source pieces plus '</s>'; `target_tokens`: the generated pieces, '</s>'
    included when it ended by eos (unknowns replaced when asked); `attention`: float32
    [len(target_tokens), len(source_tokens)] when return_attention, else None; `score`: the ranking
    score (log_prob, length-normalised when length_penalty > 0); `log_prob`: natural log.
    """

    text: str
    score: float
    log_prob: float
    finish_reason: FinishReason
    source_tokens: tuple[str, ...]
    target_tokens: tuple[str, ...]
    attention: np.ndarray | None = None


@dataclass(frozen=True)
class TextTranslation:
    """The hypotheses of one input text, best first."""

    hypotheses: list[TranslatedHypothesis]

    @property
    def best(self) -> TranslatedHypothesis:
        return self.hypotheses[0]


@dataclass(frozen=True)
class TranslateOutcome:
    """A whole Translate call: the model version that served it and one TextTranslation per text, in order."""

    model: str
    version: int
    translations: list[TextTranslation]


@dataclass(frozen=True)
class StreamUpdate:
    """One message of a streamed translation.

    Token updates (greedy only): `token` the new piece, `text` the text of every token so far, `index`
    the token's 0-based position, `final` False. The last update: `final` True, `hypotheses` the result
    (exactly what translate() gives for the text), `text` the best hypothesis' text, `index` the number
    of token updates before it. The eos token is never sent as a token update.
    """

    model: str
    version: int
    token: str
    text: str
    index: int
    final: bool
    hypotheses: list[TranslatedHypothesis] = field(default_factory=list)


@dataclass(frozen=True)
class _PreparedText:
    source_ids: np.ndarray
    source_tokens: tuple[str, ...]


class Dataplane:
    """Validates, tokenizes, decodes through the engine client and detokenizes. One per server process.

    `pending`: the translation calls the transports have picked up (`admit_pickup`) that have not reached
    translate() or translate_stream() yet. `clock` (time.monotonic) times what admission measures.
    `narrow_when_backlogged`: the gate lets fewer calls in while calls wait in gRPC core (FairGate.follow_backlog);
    for a front-end process. One process keeps its full limit: there core's backlog moves into the lines without it,
    and narrowing cost a fifth of its goodput under overload (docs/reliability.md, Turns).
    """

    def __init__(
        self,
        client: EngineClient,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        narrow_when_backlogged: bool = False,
    ) -> None:
        self.client = client
        self._narrow_when_backlogged = narrow_when_backlogged
        self.registry = client.registry
        self.settings = settings
        self.pending = PendingCalls()
        self.gate = FairGate(settings.max_active_calls, clock)
        self._clock = clock
        self._shortest_at: float | None = None
        self._shortest_s = 0.0

    # ----- admission at pickup ----------------------------------------------------------------------

    def admit_pickup(self, waited_s: float | None = None) -> None:
        """A transport has just picked up a translation call, in the task that will run it, after the call waited
        about `waited_s` seconds to be picked up: refuse it now (Overloaded, reason BACKLOG_WAIT, with a retry
        hint) when the calls picked up before it (at the rate they have been reaching translate()) and the
        shortest model queue would keep it from starting within what is left of max_queue_wait_ms (never less than
        QUEUE_SHARE_KEPT of it); otherwise count it as pending until it reaches translate() or ends.

        Why here: refused before its request is parsed, a call costs the process least, so the process answers
        more calls per second and the calls that wait to be picked up wait less. Why the share kept: the time a
        call waited before pickup is spent; refusing it does not give that back to anyone (a client that keeps
        its calls in flight sends the next at once), but a queue cut below what keeps the batch full wastes the
        engine.

        `waited_s` None: the transport cannot tell how long calls wait to be picked up (HTTP); when it can, the
        gate of a front-end follows it (FairGate.follow_backlog), and when none has for a while, widens
        (FairGate.follow_unreported)."""
        if self._narrow_when_backlogged:
            if waited_s is None:
                self.gate.follow_unreported()
            else:
                self.gate.follow_backlog(waited_s)
        if waited_s is None:
            waited_s = 0.0
        pending, now = self.pending, self._clock()
        pending.observe(now)
        bound_s = self.settings.max_queue_wait_ms / 1000.0
        if bound_s <= 0.0:
            return self._pending(pending, waited_s)
        ahead = pending.count
        on_the_way_s = (pending.drain.wait_s(ahead) or 0.0) if ahead else 0.0
        queued_s = self._shortest_queue_s(now)
        allowed_s = max(bound_s - waited_s, QUEUE_SHARE_KEPT * bound_s)
        if on_the_way_s + queued_s > allowed_s:
            queue = f"{queued_s:.3f} s" if math.isfinite(queued_s) else "forever (it has not moved lately)"
            raise Overloaded(
                f"the server cannot start this call within {bound_s:.3f} s (max_queue_wait_ms): it waited about "
                f"{waited_s:.3f} s to be picked up, and would wait {on_the_way_s:.3f} s more behind {ahead} calls on "
                f"their way to a model's queue, then {queue} in the shortest queue; retry later",
                # The model queues alone keep it from starting: the same reason the queue's own check gives.
                reason=QUEUE_WAIT if queued_s > allowed_s else BACKLOG_WAIT,
                retry_after_s=min(on_the_way_s + queued_s - allowed_s, LONGEST_RETRY_HINT_S),
            )
        return self._pending(pending, waited_s)

    def _shortest_queue_s(self, now: float) -> float:
        """The expected wait in the shortest model queue, looked up at most every QUEUE_LOOK_INTERVAL_S (it is an
        estimate already, and looking costs every version's counts)."""
        if self._shortest_at is None or now - self._shortest_at >= QUEUE_LOOK_INTERVAL_S:
            self._shortest_at = now
            self._shortest_s = min(
                (self.client.expected_wait_s(served) for served in self.registry.served_versions()), default=0.0
            )
        return self._shortest_s

    @staticmethod
    def _pending(pending: PendingCalls, waited_s: float) -> None:
        task = asyncio.current_task()
        if task is not None:
            pending.add(task, waited_s)

    def _reached(self) -> float:
        """The call of this task reached the dataplane: how long it waited before it was picked up (0 when no
        transport said)."""
        task = asyncio.current_task()
        return self.pending.remove(task) if task is not None else 0.0

    # ----- model metadata ---------------------------------------------------------------------------

    def list_models(self) -> list[ModelDescription]:
        return self.registry.describe_all()

    def get_model(self, name: str, version: str) -> ModelDescription:
        return self.registry.describe(name, version)

    @property
    def default_model(self) -> str:
        return self.registry.default_model

    def server_ready(self) -> bool:
        """Every model of the repository has a loaded version, and the server is not draining
        (ModelRegistry.all_loaded)."""
        return self.registry.all_loaded

    def model_ready(self, name: str, version: str) -> bool:
        """Model `name` version `version` ('' = latest loaded) accepts requests now (see ModelRegistry.is_ready)."""
        return self.registry.is_ready(name, version)

    # ----- translation ------------------------------------------------------------------------------

    async def translate(
        self,
        model: str,
        version: str,
        texts: Sequence[str],
        options: DecodeOptions,
        deadline: float | None = None,
        *,
        on_resolved: OnResolved | None = None,
        client: Callable[[], Hashable] | None = None,
    ) -> TranslateOutcome:
        """Translate every text with model `model` ('' = default) version `version` ('' = latest).

        `options` as the client sent them (0 = default). `deadline`: time.monotonic() seconds, None = none.
        `client` names whose line the call waits its turn in when max_active_calls are in the engines (the
        transport's name for the connection; called only then; None: one line for all such calls). Raises
        InvalidRequest, ModelNotFound, Overloaded, DeadlineExceeded, Unavailable, EngineFailure. If one text fails
        the call fails with that error and the other texts are cancelled; cancelling the awaiting task cancels
        them all.
        """
        waited_s = self._reached()
        arrival = time.monotonic()
        served, decode = self._resolve_call(model, version, texts, options, on_resolved, waited_s)
        prepared = [self._prepare(served, index, text) for index, text in enumerate(texts)]
        gate, turn_began = self.gate, None
        if not gate.try_enter():
            turn_began = self._clock()
            await gate.wait_turn(client() if client is not None else None, self.settings.max_queue_wait_ms / 1000.0)
        try:
            if turn_began is not None:
                waited_s += self._clock() - turn_began
                if self._retired_meanwhile(served):
                    # A hot reload retired the version while the call waited its turn. Its engine stops once the
                    # calls inside it are done, and a call waiting here is not one of them: the call goes to the
                    # version that serves now, tokenized for it (or, naming the retired version by number, gets
                    # what a new call naming it gets).
                    served, decode = self._resolve_call(model, version, texts, options, on_resolved, waited_s)
                    prepared = [self._prepare(served, index, text) for index, text in enumerate(texts)]
                else:
                    # The queue was judged before the wait; the call goes in now, behind what went in meanwhile,
                    # with the time it waited for its turn spent too.
                    self.client.check_room(served, len(texts), waited_s)
            # All texts or none: a call refused for a full queue leaves nothing behind in it.
            handles = self.client.submit(
                served,
                [
                    EngineRequest(text.source_ids, decode, deadline=deadline, stream=False, arrival=arrival)
                    for text in prepared
                ],
            )
            try:
                if len(handles) == 1:  # most calls: no task of its own to wait in
                    results = [await handles[0].result()]
                else:
                    results = await asyncio.gather(*(handle.result() for handle in handles))
            except BaseException:
                for handle in handles:  # idempotent; a resolved handle ignores it
                    handle.cancel()
                raise
        finally:
            gate.leave()  # done with the engines: the next call's turn, before this one's answer is built
        translations = [
            TextTranslation(self._hypotheses(served, text, result, options.replace_unknowns))
            for text, result in zip(prepared, results, strict=True)
        ]
        return TranslateOutcome(served.name, served.version, translations)

    async def translate_stream(
        self,
        model: str,
        version: str,
        text: str,
        options: DecodeOptions,
        deadline: float | None = None,
        *,
        on_resolved: OnResolved | None = None,
    ) -> AsyncGenerator[StreamUpdate, None]:
        """Translate ONE text, yielding token updates as they are decoded (greedy) and a final update.

        Validation happens at the first iteration. Same errors as translate(); closing the iterator (the
        callers use contextlib.aclosing, so a client that goes away mid-stream cancels now, not at
        collection) or cancelling the iterating task cancels the engine request.
        """
        waited_s = self._reached()
        arrival = time.monotonic()
        served, decode = self._resolve_call(model, version, [text], options, on_resolved, waited_s)
        prepared = self._prepare(served, 0, text)
        name, number = served.name, served.version
        (handle,) = self.client.submit(
            served,
            [EngineRequest(prepared.source_ids, decode, deadline=deadline, stream=decode.greedy, arrival=arrival)],
        )
        try:
            index = 0
            if decode.greedy:
                tokenizer = served.model.target_tokenizer
                decoder = tokenizer.incremental_decoder()  # O(1) per token, not a decode of the whole prefix
                token_ids: list[int] = []
                alignment: list[int] = []
                replacing = False
                async for event in handle.tokens():
                    if event.token_id == EOS:
                        continue
                    token_ids.append(event.token_id)
                    alignment.append(event.alignment)
                    decoder.push(event.token_id)
                    replacing = replacing or (options.replace_unknowns and event.token_id == UNK)
                    if replacing:  # rare: the whole text is rendered again with the replacements
                        pieces, text_so_far = self._render(
                            tokenizer, token_ids, alignment, prepared.source_tokens, options.replace_unknowns
                        )
                        piece = pieces[-1]
                    else:
                        piece, text_so_far = tokenizer.id_to_piece(event.token_id), decoder.text
                    yield StreamUpdate(name, number, piece, text_so_far, index, final=False)
                    index += 1
            result = await handle.result()
            hypotheses = self._hypotheses(served, prepared, result, options.replace_unknowns)
            yield StreamUpdate(name, number, "", hypotheses[0].text if hypotheses else "", index, True, hypotheses)
        finally:
            handle.cancel()  # no-op once resolved; otherwise the client went away mid-stream

    def _retired_meanwhile(self, served: ServedVersion) -> bool:
        """`served` is no longer among its model's served versions: a hot reload retired it. Not what resolving
        again would tell: a newer version that merely joined it (loaded_versions > 1) retires nothing, and while the
        server drains, resolving refuses, but the engines still take the calls let in until they stop."""
        entry = self.registry.entry(served.name)
        return entry is None or served.version not in entry.served

    # ----- validation and conversion ----------------------------------------------------------------

    def _resolve_call(
        self,
        model: str,
        version: str,
        texts: Sequence[str],
        options: DecodeOptions,
        on_resolved: OnResolved | None,
        waited_s: float,
    ) -> tuple[ServedVersion, DecodeOptions]:
        """What both translate calls check first: the model version, the texts, room in its queue and time to start
        within max_queue_wait_ms, `waited_s` of it spent before pickup (before any tokenizing: refusing under
        overload must be cheap) and the options, resolved for the engine."""
        served = self.registry.resolve(model, version)
        if on_resolved is not None:
            on_resolved(served.name, served.version)
        self._check_texts(texts)
        self.client.check_room(served, len(texts), waited_s)
        return served, self._resolved_options(served, options)

    def _check_texts(self, texts: Sequence[str]) -> None:
        if len(texts) == 0:
            raise InvalidRequest("texts is empty: send at least one text")
        limit = self.settings.max_texts_per_request
        if len(texts) > limit:
            raise InvalidRequest(f"{len(texts)} texts in one request, the maximum is {limit}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(f"texts[{index}] is not text")
            if not text.strip():
                raise InvalidRequest(f"texts[{index}] is empty or only whitespace")
            size = len(text.encode("utf-8"))
            if size > self.settings.max_text_bytes:
                raise InvalidRequest(
                    f"texts[{index}] is {size} bytes of UTF-8, the maximum is {self.settings.max_text_bytes}"
                )

    def _resolved_options(self, served: ServedVersion, options: DecodeOptions) -> DecodeOptions:
        """`options` as the client sent them (0 = default), checked against the model and the settings, with
        every default resolved: `beam_size` 0 or 1 = greedy; `num_hypotheses` 0 = 1; `max_length` 0 = the
        model's max_target_tokens unless --default-max-length lowers it; `length_penalty` alpha >= 0."""
        limits = served.model.document.limits
        widest = min(self.settings.max_beam_size, limits.top_k)
        beam = max(int(options.beam_size), 1)
        if beam > widest:
            raise InvalidRequest(
                f"beam_size {beam} exceeds the maximum {widest} for model {served.label} (the smaller of the "
                f"server's max_beam_size {self.settings.max_beam_size} and the model's top_k {limits.top_k})"
            )
        hypotheses = max(int(options.num_hypotheses), 1)
        if hypotheses > beam:
            raise InvalidRequest(
                f"num_hypotheses {hypotheses} exceeds beam_size {beam}: a beam of {beam} returns at most {beam} "
                "hypotheses"
            )
        longest = limits.max_target_tokens
        max_length = int(options.max_length)
        if max_length == 0:
            configured = self.settings.default_max_length
            max_length = min(configured, longest) if configured > 0 else longest
        elif max_length > longest:
            raise InvalidRequest(
                f"max_length {max_length} exceeds the maximum {longest} for model {served.label} (its "
                "max_target_tokens)"
            )
        penalty = float(options.length_penalty)
        if not math.isfinite(penalty) or penalty < 0.0:
            raise InvalidRequest(f"length_penalty {penalty} must be a finite number >= 0")
        return DecodeOptions(
            beam_size=beam,
            num_hypotheses=hypotheses,
            max_length=max_length,
            length_penalty=penalty,
            return_attention=bool(options.return_attention),
            replace_unknowns=bool(options.replace_unknowns),
        )

    def _prepare(self, served: ServedVersion, index: int, text: str) -> _PreparedText:
        tokenizer = served.model.source_tokenizer
        ids = tokenizer.encode(text)
        if not ids:
            # Only characters the model's normalisation removes (bidi marks, zero-width characters, dashes, ...):
            # nothing to translate, as for a text that is only whitespace.
            raise InvalidRequest(
                f"texts[{index}] is empty once model {served.label} normalises it "
                f"({tokenizer.normalization.describe()})"
            )
        limit = served.model.document.limits.max_source_tokens
        if len(ids) + 1 > limit:
            raise InvalidRequest(
                f"texts[{index}] has {len(ids) + 1} source tokens (</s> included), more than the "
                f"{limit} model {served.label} accepts"
            )
        pieces = tuple(tokenizer.id_to_piece(token_id) for token_id in ids) + (EOS_PIECE,)
        return _PreparedText(np.array([*ids, EOS], dtype=np.int64), pieces)

    def _hypotheses(
        self, served: ServedVersion, text: _PreparedText, result: EngineResult, replace_unknowns: bool
    ) -> list[TranslatedHypothesis]:
        return [self._hypothesis(served, text, hypothesis, replace_unknowns) for hypothesis in result.hypotheses]

    def _hypothesis(
        self, served: ServedVersion, text: _PreparedText, hypothesis: Hypothesis, replace_unknowns: bool
    ) -> TranslatedHypothesis:
        pieces, rendered = self._render(
            served.model.target_tokenizer,
            hypothesis.token_ids,
            hypothesis.alignment,
            text.source_tokens,
            replace_unknowns,
        )
        attention = hypothesis.attention
        if attention is not None:
            attention = np.asarray(attention, dtype=np.float32)
        return TranslatedHypothesis(
            text=rendered,
            score=float(hypothesis.score),
            log_prob=float(hypothesis.log_prob),
            finish_reason=hypothesis.finish_reason,
            source_tokens=text.source_tokens,
            target_tokens=tuple(pieces),
            attention=attention,
        )

    @classmethod
    def _render(
        cls,
        tokenizer: Tokenizer,
        token_ids: Sequence[int],
        alignment: Sequence[int],
        source_tokens: Sequence[str],
        replace_unknowns: bool,
    ) -> tuple[list[str], str]:
        """The target pieces and the detokenized text of `token_ids`.

        With `replace_unknowns`, each UNK is replaced (in pieces and text) by the source piece it
        attends to most; an UNK aligned with the source's '</s>' stays unknown.
        """
        pieces = [tokenizer.id_to_piece(int(token_id)) for token_id in token_ids]
        text = tokenizer.decode(token_ids)
        if not replace_unknowns or UNK not in token_ids:
            return pieces, text
        last_source = len(source_tokens) - 1  # the '</s>' position
        replacements: list[str] = []
        for position, token_id in enumerate(token_ids):
            if token_id != UNK:
                continue
            aligned = alignment[position] if position < len(alignment) else last_source
            if 0 <= aligned < last_source:
                pieces[position] = source_tokens[aligned]
            replacements.append(pieces[position])
        return pieces, cls._replace_in_text(tokenizer, token_ids, text, replacements)

    @staticmethod
    def _replace_in_text(tokenizer: Tokenizer, token_ids: Sequence[int], text: str, replacements: list[str]) -> str:
        """Put `replacements` in place of the unknown-token surfaces of `text`, in order.

        The surface is whatever the tokenizer decodes UNK to ('<unk>', ' ⁇ ', ...). When the known
        tokens alone already spell that surface, occurrences cannot be told apart and the text is
        left as decoded (the target pieces still carry the replacements).
        """
        surface = tokenizer.decode([UNK]).strip()
        known_text = tokenizer.decode([token_id for token_id in token_ids if token_id != UNK])
        parts = text.split(surface)
        if not surface or surface in known_text or len(parts) != len(replacements) + 1:
            return text
        # Sentencepiece marks word starts with U+2581; in running text that is the space already there.
        words = [replacement.replace("\u2581", "") or replacement for replacement in replacements]
        rebuilt = parts[0]
        for word, part in zip(words, parts[1:], strict=False):
            rebuilt += word + part
        return rebuilt

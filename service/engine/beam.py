"""Search bookkeeping for one request: greedy or beam, one decoder step at a time.

A search owns a fixed number of decoder rows for the whole life of its request (1 for greedy,
beam_size for beam). After each decoder step it receives the step outputs of its own rows and decides
which row each next row continues from (its parent), which token each next row is fed, and whether
the request is done. It never sees other requests, which is what makes results batch-invariant.

Beam search, as implemented here:
- All beam_size rows start from bos, but only row 0 is live: the copies start with a cumulative score of
  -inf, so the first step's candidates all come from one row and identical beams never fill the beam.
  (The row count stays constant, so a request's memory rows never change while it decodes.)
- Each step ranks the beam x top_k candidates by cumulative log probability (ties: lower row, then
  higher-ranked candidate first). Eos candidates among the best 2 x beam_size go to the finished list,
  scored with the length penalty; the best beam_size non-eos candidates continue.
- The search stops only when no live beam can still reach the best num_hypotheses: with log
  probabilities <= 0 a live beam's final score is at most its current sum divided by the most favourable
  length penalty it can still get, so stopping then returns exactly what continuing would. We do not use
  the fairseq rule (stop once beam_size hypotheses have finished): low-ranked eos candidates can fill the
  finished list early, and the search would then return worse translations than greedy decoding.
  At max_length every live beam finishes with reason LENGTH.
- Candidates with a -inf (or NaN) score never finish; they can only occupy a row when fewer finite ones
  exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from service.engine.records import DecodeOptions, FinishReason, Hypothesis, TokenEvent


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha for `length` generated tokens; 1.0 when alpha is 0."""
    if alpha == 0.0:
        return 1.0
    return ((5.0 + length) / 6.0) ** alpha


def normalised_score(log_prob: float, length: int, alpha: float) -> float:
    """The ranking score of a hypothesis: its summed log probability over the length penalty."""
    return log_prob / length_penalty(length, alpha)


@dataclass(frozen=True)
class StepDecision:
    """What a search wants for its rows after one decoder step.

    `parents`: int64 [rows], the row (0-based, within this request) each next row continues from;
        None when every row continues from itself.
    `next_tokens`: int64 [rows], the token each next row is fed.
    `done`: the request is finished; its rows leave the batch and `hypotheses()` is final.
    `events`: tokens to stream now (greedy streaming requests only).
    """

    parents: np.ndarray | None
    next_tokens: np.ndarray
    done: bool
    events: list[TokenEvent] = field(default_factory=list)


class GreedySearch:
    """Top-1 decoding on one row."""

    def __init__(self, options: DecodeOptions, *, eos_id: int, stream: bool = False) -> None:
        if not options.greedy:
            raise ValueError(f"GreedySearch needs beam_size 1, got {options.beam_size}")
        self.options = options
        self.rows = 1
        self.steps = 0
        self._eos_id = eos_id
        self._stream = stream
        self._tokens: list[int] = []
        self._alignment: list[int] = []
        self._attention: list[np.ndarray] = []
        self._log_prob = 0.0
        self._finish_reason: FinishReason | None = None

    def advance(self, log_probs: np.ndarray, token_ids: np.ndarray, attention: np.ndarray) -> StepDecision:
        """Take the step's top-1 candidate. Inputs are this request's rows: [1, K], [1, K], [1, source_len]."""
        token = int(token_ids[0, 0])
        token_log_prob = float(log_probs[0, 0])
        alignment = int(np.argmax(attention[0]))
        attention_row = attention[0].copy() if self.options.return_attention else None
        position = len(self._tokens)
        self._tokens.append(token)
        self._alignment.append(alignment)
        if attention_row is not None:
            self._attention.append(attention_row)
        self._log_prob += token_log_prob
        self.steps += 1
        if token == self._eos_id:
            self._finish_reason = FinishReason.EOS
        elif len(self._tokens) >= self.options.max_length:
            self._finish_reason = FinishReason.LENGTH
        events = []
        if self._stream:
            events.append(TokenEvent(token, position, token_log_prob, alignment, attention_row))
        return StepDecision(
            parents=None,
            next_tokens=np.array([token], dtype=np.int64),
            done=self._finish_reason is not None,
            events=events,
        )

    def hypotheses(self) -> list[Hypothesis]:
        """The one hypothesis (valid once a decision said done)."""
        if self._finish_reason is None:
            raise RuntimeError("the greedy search has not finished")
        attention = np.stack(self._attention) if self.options.return_attention else None
        return [
            Hypothesis(
                token_ids=list(self._tokens),
                score=normalised_score(self._log_prob, len(self._tokens), self.options.length_penalty),
                log_prob=self._log_prob,
                finish_reason=self._finish_reason,
                alignment=list(self._alignment),
                attention=attention,
            )
        ]


@dataclass(frozen=True)
class _BeamStep:
    """One step of beam history, indexed by the row each entry produced (backpointers, not copies)."""

    tokens: np.ndarray  # int64 [beam]: the token row j received at this step
    parents: np.ndarray  # int64 [beam]: row of the previous step row j continues
    alignment: np.ndarray  # int64 [beam]: argmax source position of the parent's attention
    attention: np.ndarray | None  # float32 [beam, source_len] when return_attention


class BeamSearch:
    """Beam search over beam_size rows (see the module docstring for the exact rules)."""

    def __init__(self, options: DecodeOptions, *, eos_id: int) -> None:
        if options.beam_size < 2:
            raise ValueError(f"BeamSearch needs beam_size >= 2, got {options.beam_size}")
        self.options = options
        self.rows = options.beam_size
        self.steps = 0
        self._eos_id = eos_id
        # float64 cumulative scores: ranking sums of float32 log probs without extra rounding.
        self._scores = np.full(self.rows, -math.inf, dtype=np.float64)
        self._scores[0] = 0.0
        self._history: list[_BeamStep] = []
        self._finished: list[Hypothesis] = []
        self._done = False

    def advance(self, log_probs: np.ndarray, token_ids: np.ndarray, attention: np.ndarray) -> StepDecision:
        """Extend the beam by one token. Inputs are this request's rows: [beam, K], [beam, K], [beam, source_len]."""
        if self._done:
            raise RuntimeError("the beam search has already finished")
        beam = self.rows
        top_k = token_ids.shape[1]
        step = len(self._history)

        candidates = (self._scores[:, None] + log_probs.astype(np.float64)).ravel()
        candidates[np.isnan(candidates)] = -math.inf
        flat_ids = token_ids.reshape(-1)
        order = np.argsort(-candidates, kind="stable")
        ordered_ids = flat_ids[order]
        is_eos = ordered_ids == self._eos_id
        parent_alignment = np.argmax(attention, axis=1).astype(np.int64)

        for position in np.flatnonzero(is_eos[: 2 * beam]):
            index = int(order[position])
            score = float(candidates[index])
            if not math.isfinite(score):
                continue
            parent = index // top_k
            self._finished.append(
                self._hypothesis(
                    prefix_step=step - 1,
                    prefix_row=parent,
                    last_token=self._eos_id,
                    last_alignment=int(parent_alignment[parent]),
                    last_attention=attention[parent] if self.options.return_attention else None,
                    log_prob=score,
                    reason=FinishReason.EOS,
                )
            )

        kept = order[~is_eos][:beam]
        kept_scores = candidates[kept]
        if kept.shape[0] < beam:  # only when the model repeats ids within a row; pad with dead rows
            missing = beam - kept.shape[0]
            kept = np.concatenate([kept, np.full(missing, kept[0] if kept.size else 0, dtype=kept.dtype)])
            kept_scores = np.concatenate([kept_scores, np.full(missing, -math.inf)])
        parents = (kept // top_k).astype(np.int64)
        next_tokens = flat_ids[kept].astype(np.int64)
        self._history.append(
            _BeamStep(
                tokens=next_tokens,
                parents=parents,
                alignment=parent_alignment[parents],
                attention=attention[parents].copy() if self.options.return_attention else None,
            )
        )
        self._scores = kept_scores
        self.steps += 1

        if step + 1 >= self.options.max_length:
            self._finish_live(step)
            self._done = True
        elif self._nothing_left_to_gain(step):
            self._done = True
        return StepDecision(parents=parents, next_tokens=next_tokens, done=self._done)

    def hypotheses(self) -> list[Hypothesis]:
        """The best num_hypotheses finished hypotheses, best first (valid once a decision said done)."""
        if not self._done:
            raise RuntimeError("the beam search has not finished")
        finished = self._finished
        if not finished:  # every candidate had a -inf score: report the live beams rather than nothing
            self._finish_live(len(self._history) - 1, finite_only=False)
            finished = self._finished
        ranked = sorted(finished, key=lambda hypothesis: -hypothesis.score)  # stable: earlier first on ties
        return ranked[: self.options.num_hypotheses]

    def _nothing_left_to_gain(self, step: int) -> bool:
        """True when no live beam can still enter the best num_hypotheses finished ones."""
        wanted = self.options.num_hypotheses
        if len(self._finished) < wanted:
            return False
        live = self._scores[np.isfinite(self._scores)]
        if live.size == 0:
            return True
        threshold = sorted((h.score for h in self._finished), reverse=True)[wanted - 1]
        best_live = float(live.max())
        alpha = self.options.length_penalty
        # A live beam finishes with between step + 2 and max_length tokens and its sum can only fall
        # (log probs <= 0); the bound takes the most favourable penalty over that range.
        bound = max(
            normalised_score(best_live, step + 2, alpha),
            normalised_score(best_live, self.options.max_length, alpha),
        )
        return threshold > bound

    def _finish_live(self, step: int, *, finite_only: bool = True) -> None:
        """Move the live beams (rows after `step`) to the finished list with reason LENGTH."""
        for row in range(self.rows):
            score = float(self._scores[row])
            if finite_only and not math.isfinite(score):
                continue
            record = self._history[step]
            self._finished.append(
                self._hypothesis(
                    prefix_step=step - 1,
                    prefix_row=int(record.parents[row]),
                    last_token=int(record.tokens[row]),
                    last_alignment=int(record.alignment[row]),
                    last_attention=record.attention[row] if record.attention is not None else None,
                    log_prob=score,
                    reason=FinishReason.LENGTH,
                )
            )

    def _hypothesis(
        self,
        *,
        prefix_step: int,
        prefix_row: int,
        last_token: int,
        last_alignment: int,
        last_attention: np.ndarray | None,
        log_prob: float,
        reason: FinishReason,
    ) -> Hypothesis:
        """Build a hypothesis from the history of `prefix_row` up to `prefix_step` plus one last token."""
        tokens = [last_token]
        alignment = [last_alignment]
        attention_rows = [last_attention] if last_attention is not None else []
        row = prefix_row
        for step in range(prefix_step, -1, -1):
            record = self._history[step]
            tokens.append(int(record.tokens[row]))
            alignment.append(int(record.alignment[row]))
            if record.attention is not None:
                attention_rows.append(record.attention[row])
            row = int(record.parents[row])
        tokens.reverse()
        alignment.reverse()
        attention_rows.reverse()
        return Hypothesis(
            token_ids=tokens,
            score=normalised_score(log_prob, len(tokens), self.options.length_penalty),
            log_prob=log_prob,
            finish_reason=reason,
            alignment=alignment,
            attention=np.stack(attention_rows).astype(np.float32, copy=False)
            if self.options.return_attention
            else None,
        )


Search = GreedySearch | BeamSearch


def new_search(options: DecodeOptions, *, eos_id: int, stream: bool = False) -> Search:
    """The search for a request: greedy for beam_size 1, else beam (which streams nothing per step)."""
    if options.greedy:
        return GreedySearch(options, eos_id=eos_id, stream=stream)
    return BeamSearch(options, eos_id=eos_id)

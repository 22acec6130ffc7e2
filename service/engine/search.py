"""Greedy and beam search over the whole decode batch at once, and the hypotheses of finished requests.

Greedy rows advance in a handful of numpy operations for all of them together. Beam requests are grouped
by width; each group advances with one sort over [requests, width x top_k] candidates. The only per-request
Python is for what is rare per step: eos candidates entering a request's n-best, requests finishing, and the
extras a request asked for (attention rows, streamed tokens). Hypotheses become Python objects only when a
request finishes.

Beam search, exactly:
- All rows of a beam start from bos, but only row 0 is live (the copies start at -inf), so the first
  step's candidates come from one row and identical beams never fill the beam.
- Each step ranks the beam x top_k candidates by cumulative log probability (ties: lower row, then the
  higher-ranked candidate). Eos candidates among the best 2 x beam join the finished n-best, scored with
  the length penalty; the best `beam` non-eos candidates continue.
- The search stops only when no live beam can still reach the best num_hypotheses: with log
  probabilities <= 0 a live beam's final score is at most its current sum divided by the most favourable
  length penalty it can still get, so stopping then returns exactly what continuing would. (Not the
  fairseq rule, stop once beam_size hypotheses have finished: low-ranked eos candidates can fill the list
  early, and the search would then return worse translations than greedy decoding.)
  At max_length every live beam finishes with reason LENGTH.
- Candidates with a -inf (or NaN) score never finish; they occupy a row only when fewer finite ones exist.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.engine.batch import GATHER_FROM, DecodeBatch, FinishedCandidate
from service.engine.records import FinishReason, Hypothesis, TokenEvent
from service.runtime.step import StepOutput


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha for `length` generated tokens; 1.0 when alpha is 0."""
    if alpha == 0.0:
        return 1.0
    try:
        return float(((5.0 + length) / 6.0) ** alpha)
    except OverflowError:  # an absurd alpha: every length is infinitely penalised, as the array form says
        return math.inf


def normalised_score(log_prob: float, length: int, alpha: float) -> float:
    """The ranking score of a hypothesis: its summed log probability over the length penalty."""
    return log_prob / length_penalty(length, alpha)


def _normalised(log_probs: np.ndarray, lengths: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """normalised_score over arrays (alpha 0 divides by exactly 1.0, as the scalar form does)."""
    with np.errstate(over="ignore"):
        penalty = np.where(alphas == 0.0, 1.0, ((5.0 + lengths) / 6.0) ** alphas)
    return log_probs / penalty


# ----- greedy --------------------------------------------------------------------------------------------


def _advance_few_greedy(batch: DecodeBatch, count: int, output: StepOutput, eos_id: int) -> list[int]:
    """advance_greedy for a batch of fewer than GATHER_FROM greedy rows that neither stream nor keep attention:
    the same updates, row by row with scalars (the numbers are the same: one float64 addition per step)."""
    tokens = output.topk_ids[:count, 0].tolist()
    log_probs = output.topk_log_probs[:count, 0].tolist()
    alignment = output.attention[:count].argmax(axis=1).tolist()
    row_slot, row_steps, row_score, row_token, row_max_length = (
        batch.row_slot,
        batch.row_steps,
        batch.row_score,
        batch.row_token,
        batch.row_max_length,
    )
    finished = []
    for row in range(count):
        slot, position, token = int(row_slot[row]), int(row_steps[row]), tokens[row]
        batch.out_token[slot, position] = token
        batch.out_log_prob[slot, position] = log_probs[row]
        batch.out_alignment[slot, position] = alignment[row]
        row_score[row] += log_probs[row]  # a float32 value, exact as a Python float
        row_steps[row] = position + 1
        row_token[row] = token
        if token == eos_id or position + 1 >= row_max_length[row]:
            finished.append(slot)
    return finished


def advance_greedy(
    batch: DecodeBatch, rows: np.ndarray | None, output: StepOutput, eos_id: int, events: list[tuple[int, TokenEvent]]
) -> list[int]:
    """Take the top-1 candidate of every greedy row (`rows`; None = every row of the batch is greedy).

    Records token, log probability and alignment at each request's position, feeds the token back, appends
    streamed tokens (key, event) to `events`, and returns the slots that finished.
    """
    count = batch.rows
    if rows is None and count < GATHER_FROM and not (batch.streaming or batch.any_attention):
        return _advance_few_greedy(batch, count, output, eos_id)
    index: slice | np.ndarray = slice(0, count) if rows is None else rows
    tokens = output.topk_ids[index, 0]
    log_probs = output.topk_log_probs[index, 0]
    attention = output.attention[index]
    slots = batch.row_slot[index]
    positions = batch.row_steps[index].copy()  # a view when `index` is a slice, and row_steps moves on below
    # Attention is 0 beyond each row's source (softmax over its own positions), so the argmax over the
    # padded axis is the argmax over the row's own positions.
    alignment = attention.argmax(axis=1)
    # The three [slot, position] tables share a shape: one flat index for the three writes (a 2-D fancy index
    # would compute it for each; at 256 rows the writes took twice as long). They are C-contiguous (made whole in
    # DecodeBatch._grow), so ravel() is a view and the writes land in them.
    at = slots * batch.out_token.shape[1]
    at += positions
    batch.out_token.ravel()[at] = tokens
    batch.out_log_prob.ravel()[at] = log_probs
    batch.out_alignment.ravel()[at] = alignment
    # float64 running sums, one addition per step in order: the same value the request gets decoded alone.
    batch.row_score[index] += log_probs
    batch.row_steps[index] += 1
    batch.row_token[index] = tokens
    done = tokens == eos_id
    done |= batch.row_steps[index] >= batch.row_max_length[index]

    if batch.streaming or batch.any_attention:
        for position in np.flatnonzero(batch.row_extras[index]).tolist():
            slot = int(slots[position])
            attention_row = None
            kept = batch.slot_attention[slot]
            if kept is not None:
                attention_row = attention[position, : batch.slot_source_length[slot]].copy()
                kept.append(attention_row)
            if batch.slot_stream[slot]:
                event = TokenEvent(
                    int(tokens[position]),
                    int(positions[position]),
                    float(log_probs[position]),
                    int(alignment[position]),
                    attention_row,
                )
                events.append((batch.slot_key[slot], event))
    finished: list[int] = slots[done].tolist()
    return finished


def greedy_hypotheses(batch: DecodeBatch, slots: list[int], eos_id: int) -> list[Hypothesis]:
    """The hypothesis of each finished greedy request in `slots`, in their order."""
    if len(slots) < GATHER_FROM:
        steps, tokens, alignments, log_probs, alphas = [], [], [], [], []
        for slot in slots:
            row = int(batch.slot_rows[slot, 0])
            length = int(batch.row_steps[row])
            steps.append(length)
            tokens.append(batch.out_token[slot, :length].tolist())
            alignments.append(batch.out_alignment[slot, :length].tolist())
            log_probs.append(float(batch.row_score[row]))
            alphas.append(float(batch.slot_alpha[slot]))
    else:
        indices = np.array(slots)
        row_index = batch.slot_rows[:, 0][indices]  # a 1-D gather: cheaper than [indices, 0]
        steps = batch.row_steps[row_index].tolist()
        longest = max(steps)
        tokens = batch.out_token[indices, :longest].tolist()
        alignments = batch.out_alignment[indices, :longest].tolist()
        log_probs = batch.row_score[row_index].tolist()
        alphas = batch.slot_alpha[indices].tolist()
    # Alpha 0 (the default) divides by exactly 1.0: the score is the log probability, with no call per request.
    scores = (
        log_probs
        if not any(alphas)
        else [normalised_score(log_prob, n, alpha) for log_prob, n, alpha in zip(log_probs, steps, alphas, strict=True)]
    )
    attention = batch.slot_attention if batch.any_attention else None
    eos, length_reached = FinishReason.EOS, FinishReason.LENGTH
    hypotheses = []
    for slot, length, own_tokens, own_alignment, log_prob, score in zip(
        slots, steps, tokens, alignments, log_probs, scores, strict=True
    ):
        if len(own_tokens) != length:  # the gathered rows are as long as the longest: cut the shorter ones
            own_tokens, own_alignment = own_tokens[:length], own_alignment[:length]
        kept = attention[slot] if attention is not None else None
        hypotheses.append(
            Hypothesis(
                own_tokens,
                score,
                log_prob,
                eos if own_tokens and own_tokens[-1] == eos_id else length_reached,
                own_alignment,
                np.stack(kept) if kept is not None else None,
            )
        )
    return hypotheses


# ----- beam ----------------------------------------------------------------------------------------------
# A finished beam candidate, kept in its request's bounded n-best until the request finishes:
# (score, order, log_prob, prefix_step, prefix_row, last_token, last_alignment, last_attention, reason).
# `order` breaks ties: among equal scores the earlier finished one ranks first.


def advance_beam_group(
    batch: DecodeBatch, width: int, slots: np.ndarray, output: StepOutput, eos_id: int, reorder: np.ndarray
) -> list[int]:
    """Advance every beam request of one width; writes the rows' parents into `reorder` (the state gather
    index of the whole batch) and returns the slots that finished."""
    count = len(slots)
    each = np.arange(count)[:, None]  # row selector for per-request fancy indexing ([n, 1])
    rows = batch.slot_rows[slots, :width]  # [n, width]
    top_k = output.topk_ids.shape[1]
    candidate_ids = output.topk_ids[rows].reshape(count, width * top_k)
    candidates = (batch.row_score[rows][:, :, None] + output.topk_log_probs[rows]).reshape(count, width * top_k)
    candidates[np.isnan(candidates)] = -math.inf
    order = np.argsort(-candidates, axis=1, kind="stable")
    is_eos = candidate_ids[each, order] == eos_id
    attention = output.attention[rows]  # [n, width, S]
    parent_alignment = attention.argmax(axis=2)  # [n, width]
    steps = batch.row_steps[rows[:, 0]]  # every row of a request has taken the same steps

    # Eos candidates among the best 2 x width join the n-best (rare per step: a Python loop is fine).
    head = order[:, : 2 * width]
    for request, position in zip(
        *np.nonzero(is_eos[:, : 2 * width] & np.isfinite(candidates[each, head])), strict=False
    ):
        slot = int(slots[request])
        index = int(head[request, position])
        parent = index // top_k
        attention_row = None
        if batch.slot_attention[slot] is not None:
            attention_row = attention[request, parent, : batch.slot_source_length[slot]].copy()
        _add_finished(
            batch,
            slot,
            float(candidates[request, index]),
            int(steps[request]) - 1,
            parent,
            eos_id,
            int(parent_alignment[request, parent]),
            attention_row,
            FinishReason.EOS,
            int(steps[request]) + 1,
        )

    # The best `width` non-eos candidates continue. A stable sort on is_eos keeps rank order; when a model
    # repeats ids so that fewer than `width` non-eos candidates exist, the rest become dead (-inf) rows.
    picked = np.argsort(is_eos, axis=1, kind="stable")[:, :width]
    kept = order[each, picked]
    kept_scores = candidates[each, kept]
    dead = is_eos[each, picked]
    if dead.any():
        kept_scores[dead] = -math.inf
        kept[dead] = np.repeat(kept[:, :1], width, axis=1)[dead]
    parents = kept // top_k
    next_tokens = candidate_ids[each, kept].astype(np.int64)
    batch.history_token[slots[:, None], steps[:, None], np.arange(width)] = next_tokens
    batch.history_parent[slots[:, None], steps[:, None], np.arange(width)] = parents
    batch.history_alignment[slots[:, None], steps[:, None], np.arange(width)] = parent_alignment[each, parents]
    if batch.any_attention:
        for request, slot in enumerate(slots.tolist()):
            kept_attention = batch.slot_attention[slot]
            if kept_attention is not None:
                length = batch.slot_source_length[slot]
                kept_attention.append(attention[request, parents[request], :length].copy())
    batch.row_score[rows] = kept_scores
    batch.row_token[rows] = next_tokens
    batch.row_steps[rows] += 1
    reorder[rows] = rows[each, parents]

    # Done: max_length reached, or nothing left to gain (see the module docstring).
    limits = batch.row_max_length[rows[:, 0]]
    at_limit = steps + 1 >= limits
    for request in np.flatnonzero(at_limit).tolist():
        _finish_live(batch, int(slots[request]), int(steps[request]), finite_only=True)
    enough = batch.slot_finished_count[slots] >= batch.slot_wanted[slots]
    if not enough.any():
        limited: list[int] = slots[at_limit].tolist()
        return limited
    best_live = kept_scores.max(axis=1)  # -inf when no row is live (NaN never gets here)
    alphas = batch.slot_alpha[slots]
    bound = np.maximum(_normalised(best_live, steps + 2, alphas), _normalised(best_live, limits, alphas))
    with np.errstate(invalid="ignore"):
        settled = enough & (np.isneginf(best_live) | (batch.slot_threshold[slots] > bound))
    finished: list[int] = slots[at_limit | settled].tolist()
    return finished


def _add_finished(
    batch: DecodeBatch,
    slot: int,
    log_prob: float,
    prefix_step: int,
    prefix_row: int,
    last_token: int,
    last_alignment: int,
    last_attention: np.ndarray | None,
    reason: FinishReason,
    length: int,
) -> None:
    """Enter a finished candidate into the slot's n-best (kept to num_hypotheses, best first)."""
    score = normalised_score(log_prob, length, float(batch.slot_alpha[slot]))
    finished = batch.slot_finished[slot]
    order = int(batch.slot_finished_count[slot])
    batch.slot_finished_count[slot] = order + 1
    entry = FinishedCandidate(
        score, order, log_prob, prefix_step, prefix_row, last_token, last_alignment, last_attention, reason
    )
    wanted = int(batch.slot_wanted[slot])
    position = len(finished)
    while position and finished[position - 1].score < score:  # stable: after equal scores
        position -= 1
    if position >= wanted:
        return
    finished.insert(position, entry)
    del finished[wanted:]
    if len(finished) == wanted:
        batch.slot_threshold[slot] = finished[-1].score


def _finish_live(batch: DecodeBatch, slot: int, step: int, *, finite_only: bool) -> None:
    """Enter the live beams after `step` into the n-best with reason LENGTH."""
    width = int(batch.slot_beam[slot])
    rows = batch.rows_of(slot)
    for beam in range(width):
        score = float(batch.row_score[rows[beam]])
        if finite_only and not math.isfinite(score):
            continue
        kept = batch.slot_attention[slot]
        _add_finished(
            batch,
            slot,
            score,
            step - 1,
            int(batch.history_parent[slot, step, beam]),
            int(batch.history_token[slot, step, beam]),
            int(batch.history_alignment[slot, step, beam]),
            kept[step][beam] if kept is not None else None,
            FinishReason.LENGTH,
            step + 1,
        )


def beam_hypotheses(batch: DecodeBatch, slot: int) -> list[Hypothesis]:
    """The slot's best num_hypotheses finished hypotheses, best first."""
    if not batch.slot_finished[slot]:  # every candidate had a -inf score: report the live beams, not nothing
        _finish_live(batch, slot, int(batch.row_steps[batch.slot_rows[slot, 0]]) - 1, finite_only=False)
    kept = batch.slot_attention[slot]
    hypotheses = []
    for candidate in batch.slot_finished[slot]:
        tokens, alignment = [candidate.last_token], [candidate.last_alignment]
        attention: list[Any] = [candidate.last_attention]  # arrays when kept is not None
        row = candidate.prefix_row
        for step in range(candidate.prefix_step, -1, -1):
            tokens.append(int(batch.history_token[slot, step, row]))
            alignment.append(int(batch.history_alignment[slot, step, row]))
            if kept is not None:
                attention.append(kept[step][row])
            row = int(batch.history_parent[slot, step, row])
        tokens.reverse()
        alignment.reverse()
        attention.reverse()
        hypotheses.append(
            Hypothesis(
                token_ids=tokens,
                score=candidate.score,
                log_prob=candidate.log_prob,
                finish_reason=candidate.reason,
                alignment=alignment,
                attention=np.stack(attention).astype(np.float32, copy=False) if kept is not None else None,
            )
        )
    return hypotheses

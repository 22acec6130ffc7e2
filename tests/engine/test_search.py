"""Greedy and beam search: bookkeeping on hand-made step outputs, and exactness against exhaustive search."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from service.engine import DecodeOptions, EngineCore, EngineRequest, FinishReason, length_penalty, normalised_score

from .fakes import (
    EOS,
    FakeStepModel,
    ScriptedStepModel,
    engine_limits,
    exhaustive_search,
    greedy_reference,
    make_request,
    running,
    source,
    teacher_forced,
)

NEG = -math.inf


class Scripted:
    """One request decoded by an EngineCore over hand-made step outputs, advanced one step at a time."""

    def __init__(self, options: DecodeOptions, *, stream: bool = False) -> None:
        """`options` as a client gives them: beam_size and num_hypotheses 0 mean 1."""
        self.model = ScriptedStepModel()
        self.core = EngineCore(self.model, engine_limits(source_bucket=1))
        self.core.add(
            1,
            make_request(
                source(7, 8),
                beam=max(options.beam_size, 1),
                hypotheses=max(options.num_hypotheses, 1),
                max_length=options.max_length,
                alpha=options.length_penalty,
                attention=options.return_attention,
                stream=stream,
            ),
            0.0,
        )
        self.steps = 0
        self.output = None

    def advance(self, rows: list[list[tuple[int, float]]], focus: int = 0):
        """Run one step whose rows propose `rows` candidates; returns the core's output."""
        self.model.script.append((rows, focus))
        self.output = self.core.step()
        self.steps += 1
        return self.output

    @property
    def done(self) -> bool:
        return bool(self.output.finished)

    @property
    def hypotheses(self):
        [finished] = self.output.finished
        return finished.result.hypotheses

    @property
    def parents(self) -> list[int]:
        batch = self.core.batch
        return batch.history_parent[0, self.steps - 1, : batch.slot_beam[0]].tolist()

    @property
    def next_tokens(self) -> list[int]:
        batch = self.core.batch
        return batch.history_token[0, self.steps - 1, : batch.slot_beam[0]].tolist()

    @property
    def finished_tokens(self) -> list[list[int]]:
        """Token ids of the finished candidates kept so far (the request's n-best), best first."""
        from service.engine.search import beam_hypotheses

        batch = self.core.batch
        if not batch.slot_finished[0]:  # (beam_hypotheses would then finish the live beams)
            return []
        return [h.token_ids for h in beam_hypotheses(batch, 0)]


def test_length_penalty_is_gnmt():
    assert length_penalty(7, 0.0) == 1.0
    assert length_penalty(1, 1.0) == pytest.approx(1.0)
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    assert length_penalty(7, 0.5) == pytest.approx(math.sqrt(2.0))
    assert normalised_score(-3.0, 7, 1.0) == pytest.approx(-1.5)


def test_an_absurd_length_penalty_ranks_without_overflowing():
    assert length_penalty(3, 1e6) == math.inf and normalised_score(-2.0, 3, 1e6) == 0.0
    for beam in (1, 2):
        search = Scripted(DecodeOptions(beam_size=beam, max_length=2, length_penalty=1e300))
        search.advance([[(4, -0.1), (EOS, -2.5)]] * beam)
        search.advance([[(EOS, -0.2), (5, -1.0)]] * beam)
        assert search.done and search.hypotheses[0].token_ids == [4, EOS]


def test_greedy_takes_top1_until_eos_and_streams_each_token():
    search = Scripted(DecodeOptions(max_length=5, return_attention=True), stream=True)
    first = search.advance([[(4, -0.1), (EOS, -2.5)]], focus=1)
    assert not search.done and search.core.batch.row_token[0] == 4
    assert [(e.token_id, e.position, e.alignment) for _, e in first.events] == [(4, 0, 1)]
    last = search.advance([[(EOS, -0.25), (4, -1.5)]], focus=2)
    assert search.done and [(e.token_id, e.position) for _, e in last.events] == [(EOS, 1)]
    (hypothesis,) = search.hypotheses
    assert hypothesis.token_ids == [4, EOS]
    assert hypothesis.finish_reason is FinishReason.EOS
    assert hypothesis.log_prob == pytest.approx(-0.35)
    assert hypothesis.alignment == [1, 2]
    assert hypothesis.attention.shape == (2, 3)


def test_greedy_stops_at_max_length():
    search = Scripted(DecodeOptions(max_length=2))
    search.advance([[(5, -0.5)]])
    assert not search.done
    search.advance([[(6, -0.5)]])
    assert search.done
    (hypothesis,) = search.hypotheses
    assert hypothesis.token_ids == [5, 6] and hypothesis.finish_reason is FinishReason.LENGTH
    assert hypothesis.attention is None


def test_beam_starts_from_one_live_row_and_reorders():
    options = DecodeOptions(beam_size=2, num_hypotheses=2, max_length=2)
    search = Scripted(options)
    # Both rows see the same (bos) input at step 0; only row 0 may contribute, so 4 and 5 both survive
    # rather than two copies of 4.
    search.advance([[(4, -0.1), (5, -0.2), (EOS, -3.0)]] * 2)
    assert search.parents == [0, 0] and search.next_tokens == [4, 5]
    # Step 1: row 1 (after 5) has the better continuations, so both new rows continue row 1.
    search.advance([[(6, -2.0), (7, -2.1), (EOS, -2.2)], [(7, -0.3), (6, -0.4), (EOS, -3.0)]])
    assert search.done  # max_length 2 reached: live beams finish with reason LENGTH
    assert search.parents == [1, 1] and search.next_tokens == [7, 6]
    best, runner_up = search.hypotheses
    assert best.token_ids == [5, 7] and best.log_prob == pytest.approx(-0.5)
    assert runner_up.token_ids == [5, 6] and runner_up.log_prob == pytest.approx(-0.6)
    assert {best.finish_reason, runner_up.finish_reason} == {FinishReason.LENGTH}


def test_beam_finishes_eos_candidates_within_twice_the_beam():
    options = DecodeOptions(beam_size=2, num_hypotheses=2, max_length=5)
    search = Scripted(options)
    # Step 0: eos ranks 5th of the live row's candidates (> 2 x beam): not finished.
    search.advance([[(4, -0.1), (5, -0.2), (6, -0.3), (7, -0.4), (EOS, -3.0)]] * 2)
    assert search.finished_tokens == []
    # Step 1: eos from row 0 ranks 3rd of all candidates (after the beam, within 2 x beam) -> finished;
    # eos from row 1 ranks 6th (> 2 x beam) -> dropped.
    search.advance([[(6, -0.1), (7, -0.15), (EOS, -0.2)], [(6, -0.5), (7, -0.6), (EOS, -0.7)]])
    assert not search.done
    assert search.next_tokens == [6, 7] and search.parents == [0, 0]
    assert search.finished_tokens == [[4, EOS]]


def test_beam_stops_when_beam_size_hypotheses_finished():
    options = DecodeOptions(beam_size=2, num_hypotheses=2, max_length=10)
    search = Scripted(options)
    search.advance([[(4, -0.1), (5, -0.2), (EOS, -3.0)]] * 2)
    search.advance([[(EOS, -0.1), (6, -0.4), (7, -0.5)], [(EOS, -0.1), (6, -0.6), (7, -0.7)]])
    assert search.done
    hypotheses = search.hypotheses
    assert [h.token_ids for h in hypotheses] == [[4, EOS], [5, EOS]]
    assert all(h.finish_reason is FinishReason.EOS for h in hypotheses)


def test_beam_keeps_going_while_a_live_beam_beats_the_finished_ones():
    """Low-ranked eos candidates may fill beam_size finished slots early; a better live beam must still win."""
    options = DecodeOptions(beam_size=2, num_hypotheses=1, max_length=10)
    search = Scripted(options)
    search.advance([[(4, -0.1), (EOS, -2.0), (5, -2.1)]] * 2)
    search.advance([[(6, -0.1), (EOS, -3.0), (7, -3.5)], [(EOS, -0.1), (7, -1.0), (6, -1.5)]])
    assert not search.done  # three finished already, but "4 6" (sum -0.2) can still end better than -2.0
    search.advance([[(EOS, -0.1), (8, -2.0), (9, -2.5)], [(EOS, -0.1), (8, -2.0), (9, -2.5)]])
    assert search.done
    [best] = search.hypotheses
    assert best.token_ids == [4, 6, EOS]
    assert best.score == pytest.approx(-0.3)


@pytest.mark.parametrize(("alpha", "winner"), [(0.0, [EOS]), (5.0, [3, EOS])])
def test_length_penalty_changes_the_ranking(alpha, winner):
    # [eos]: log p -0.5 (1 token); [3, eos]: -0.7 (2 tokens). Raw sum prefers the short one; with
    # alpha 5 the penalty (7/6)^5 = 2.16 makes -0.7 / 2.16 = -0.32 beat -0.5.
    options = DecodeOptions(beam_size=2, num_hypotheses=1, max_length=3, length_penalty=alpha)
    search = Scripted(options)
    search.advance([[(EOS, -0.5), (3, -0.6), (4, -4.0)]] * 2)
    if not search.done:
        search.advance([[(EOS, -0.1), (4, -3.0), (5, -3.1)], [(EOS, -3.0), (3, -3.2), (5, -3.3)]])
    assert search.done
    (best,) = search.hypotheses
    assert best.token_ids == winner
    assert best.score == pytest.approx(normalised_score(best.log_prob, len(winner), alpha))


def test_beam_stops_early_only_when_nothing_can_beat_the_finished():
    # alpha 0: the finished [eos] (-0.5) beats every live beam (best -0.6, and sums only fall): stop now.
    search = Scripted(DecodeOptions(beam_size=2, num_hypotheses=1, max_length=3))
    search.advance([[(EOS, -0.5), (3, -0.6), (4, -4.0)]] * 2)
    assert search.done
    # With two hypotheses wanted, the second place is still open: continue.
    search = Scripted(DecodeOptions(beam_size=2, num_hypotheses=2, max_length=3))
    search.advance([[(EOS, -0.5), (3, -0.6), (4, -4.0)]] * 2)
    assert not search.done


def test_beam_ignores_impossible_candidates():
    options = DecodeOptions(beam_size=3, num_hypotheses=3, max_length=1)
    search = Scripted(options)
    search.advance([[(4, -0.1), (EOS, -1.0), (5, NEG), (6, NEG)]] * 3)
    assert search.done
    hypotheses = search.hypotheses
    assert [h.token_ids for h in hypotheses] == [[4], [EOS]]  # -inf candidates never become hypotheses
    assert all(math.isfinite(h.score) for h in hypotheses)


@pytest.mark.parametrize(
    "broken",
    [
        DecodeOptions(beam_size=0, num_hypotheses=1, max_length=4),
        DecodeOptions(beam_size=2, num_hypotheses=3, max_length=4),
        DecodeOptions(beam_size=1, num_hypotheses=0, max_length=4),
        DecodeOptions(beam_size=1, num_hypotheses=1, max_length=0),
        DecodeOptions(beam_size=1, num_hypotheses=1, max_length=4, length_penalty=-0.1),
        DecodeOptions(beam_size=1, num_hypotheses=1, max_length=4, length_penalty=math.nan),
    ],
)
def test_the_core_refuses_options_nobody_resolved(broken):
    core = EngineCore(ScriptedStepModel(), engine_limits())
    with pytest.raises(ValueError, match="unresolved decoding options"):
        core.check(EngineRequest(source(7), broken, deadline=None, stream=False, arrival=0.0))


# ----- through the scheduler, on the fake model -----

SUPPORT = (EOS, 3, 4, 5, 6)  # four ordinary tokens and eos


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("words", [(5, 9, 12), (7,), (20, 3, 3, 8)])
def test_beam_equals_exhaustive_search(alpha, words):
    # 4 tokens + eos, max_length 3: at most 16 live prefixes, so a 16-wide beam never prunes one that
    # could still win, and its 16-best must be exactly the exhaustive 16-best.
    model = FakeStepModel(vocab_size=16, top_k=16, support=SUPPORT, eos_bias=-0.5, seed=3)
    src = source(*words)
    expected = exhaustive_search(model, src, max_length=3, alpha=alpha)[:16]

    async def main():
        async with running(model) as scheduler:
            handle = scheduler.submit(
                make_request(src, beam=16, hypotheses=16, max_length=3, alpha=alpha, attention=True)
            )
            return await handle.result()

    result = asyncio.run(main())
    got = result.hypotheses
    assert [h.token_ids for h in got] == [list(s.tokens) for s in expected]
    for hypothesis, reference in zip(got, expected, strict=False):
        assert hypothesis.log_prob == pytest.approx(reference.log_prob, abs=1e-9)
        assert hypothesis.score == pytest.approx(reference.score, abs=1e-9)
        assert hypothesis.finish_reason.value == reference.reason
        assert hypothesis.alignment == list(reference.alignment)
        np.testing.assert_allclose(hypothesis.attention, reference.attention, atol=1e-7)
    assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)


def test_length_penalty_changes_the_best_translation_end_to_end():
    model = FakeStepModel(vocab_size=16, top_k=16, support=SUPPORT, eos_bias=-1.0, seed=3)
    src = source(5, 9, 12)
    best_raw = exhaustive_search(model, src, max_length=3, alpha=0.0)[0]
    best_long = exhaustive_search(model, src, max_length=3, alpha=4.0)[0]
    assert best_raw.tokens != best_long.tokens  # the fixture has to make the penalty matter

    async def main():
        async with running(model) as scheduler:
            raw = scheduler.submit(make_request(src, beam=16, max_length=3, alpha=0.0))
            long = scheduler.submit(make_request(src, beam=16, max_length=3, alpha=4.0))
            return await raw.result(), await long.result()

    raw, long = asyncio.run(main())
    assert raw.best.token_ids == list(best_raw.tokens)
    assert long.best.token_ids == list(best_long.tokens)
    assert len(long.best.token_ids) > len(raw.best.token_ids)


def test_beam_n_best_is_sorted_and_scored_by_the_model():
    model = FakeStepModel(seed=11, eos_bias=-1.0)
    src = source(4, 17, 2, 9, 30)

    async def main():
        async with running(model) as scheduler:
            return await scheduler.submit(
                make_request(src, beam=5, hypotheses=5, max_length=7, alpha=0.8, attention=True)
            ).result()

    result = asyncio.run(main())
    assert len(result.hypotheses) == 5
    scores = [h.score for h in result.hypotheses]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(h.token_ids) for h in result.hypotheses}) == 5
    for hypothesis in result.hypotheses:
        # Re-score each hypothesis by feeding its tokens to the model: the beam's bookkeeping (parents,
        # state reordering) must reproduce exactly the model's own probabilities.
        log_probs, alignment, attention = teacher_forced(model, src, hypothesis.token_ids)
        assert hypothesis.log_prob == pytest.approx(sum(log_probs), abs=1e-6)
        assert hypothesis.score == pytest.approx(hypothesis.log_prob / ((5 + len(hypothesis.token_ids)) / 6) ** 0.8)
        assert hypothesis.alignment == alignment
        np.testing.assert_array_equal(hypothesis.attention, attention)
        ended_by_eos = hypothesis.token_ids[-1] == EOS
        assert hypothesis.finish_reason is (FinishReason.EOS if ended_by_eos else FinishReason.LENGTH)
        assert EOS not in hypothesis.token_ids[:-1]
        assert ended_by_eos or len(hypothesis.token_ids) == 7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_direct_decoding(seed):
    model = FakeStepModel(seed=seed, eos_bias=-0.5)
    sources = [source(3, 8, 21), source(11), source(6, 6, 6, 6, 1, 30)]
    expected = [greedy_reference(model, src, max_length=9, alpha=0.5) for src in sources]

    async def main():
        async with running(model) as scheduler:
            handles = [scheduler.submit(make_request(src, max_length=9, alpha=0.5, attention=True)) for src in sources]
            return [await handle.result() for handle in handles]

    for result, reference in zip(asyncio.run(main()), expected, strict=False):
        (hypothesis,) = result.hypotheses
        assert hypothesis.token_ids == list(reference.tokens)
        assert hypothesis.log_prob == reference.log_prob
        assert hypothesis.score == reference.score
        assert hypothesis.finish_reason.value == reference.reason
        assert hypothesis.alignment == list(reference.alignment)
        np.testing.assert_array_equal(hypothesis.attention, reference.attention)
        assert result.generated_tokens == len(hypothesis.token_ids)

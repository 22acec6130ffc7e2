"""Turns: at most `limit` translation calls of this process in the engines at once, the others waiting their turn,
one client after another.

Why a limit at all: a Python gRPC server takes a new call from gRPC core once per turn of its event loop (grpcio
keeps one request for the next call outstanding), and a loop turn runs everything that is ready. With hundreds of
calls in progress, a turn is long, calls are taken about as fast as they are answered, and the rest wait in core's
backlog, in the order they came, where nothing of ours can see them or choose among them. A client that keeps
thousands of calls in flight then makes every other client wait behind all of them (1.3 s per call at 3,000, on
two cores). With few calls in progress, turns are short, calls are taken faster than they are answered, and the
backlog moves here, where it is cheap to hold (a future per call) and visible. (Measured in one process; a
front-end process with the engine in another took calls no faster with it: docs/reliability.md, Turns.)

Why turns by client: here the waiting calls can be ordered. Each client (a connection, as the transport names
it) has its own line, and the lines are served one call each in turn, so a client waits behind its own calls, not
behind everyone's. A line that has just begun (its client had no call waiting) is served before the lines that
have had a turn and still hold calls, as fq_codel serves new flows before old ones: a client calling one call at a
time goes in at the next place that frees, however many calls others keep waiting, and however long theirs take
(with 64 calls of 8 texts at beam 4 inside, a place frees far more often than one of 20 busy clients' calls each
would go in). A line that keeps calls after its turn joins the others at the back, so busy clients share what is
left round-robin.

What is refused: a call that would wait longer than the bound (max_queue_wait_ms) even as its client's only
waiting call (the server is behind across many clients, and a refusal tells one of them to go elsewhere). A
client's further calls wait behind its own, whatever their number. Refusing those too was measured: a client that
keeps its calls in flight sends the next one at once, the process spent its time refusing, and core's backlog,
with every other client's wait, came back.

Why fewer calls inside while core holds a backlog (`follow_backlog`): the limit alone was not enough where the
process's event loop is the bottleneck, as in a front-end process whose engine runs in another. There the calls
inside include answers waiting for the loop to build and send them, each turn of the loop has that much more to do,
and the loop took calls from core no faster than it answered them: under 3,000 calls in flight core kept about
2,900 of them, and every client waited its 1.5-2 s there. With a quarter of the limit the loop has turns to spare,
core's backlog moves here, and the lines order it. Not always a quarter: on two cores a quarter of 64 served about
15% fewer calls a second at capacity (smaller batches, more steps per call), so the gate narrows only while calls
have been waiting in core longer than NARROW_AT_S and widens again once they wait no longer than WIDEN_AT_S. And
only in front-end processes (Dataplane's narrow_when_backlogged): one process drains core into the lines at its
full limit, and narrowed there it served 76-79% of its capacity under overload instead of 97-103%.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Hashable

from service.engine_client.admission import LONGEST_RETRY_HINT_S, DrainRate
from service.errors import QUEUE_WAIT, Overloaded

NARROWED_SHARE = 0.25
"""The share of the limit let inside while gRPC core holds a backlog (follow_backlog)."""

NARROW_AT_S = 0.25
"""The gate narrows once a call has waited about this long in core before it was picked up: half the default
max_queue_wait_ms. A closed-loop client holding 240 calls in flight on one front-end keeps each about 0.1 s in core
(those beyond the limit wait there), which is a full process, not one that keeps others waiting for seconds."""

WIDEN_AT_S = 0.05
"""It widens again once calls wait no longer than this to be picked up and none waits its turn: the overload is over.
Not as soon as core's backlog has moved here: with the full limit the loop again takes calls no faster than it
answers them, and under a client that keeps its calls in flight core's backlog builds again (measured: widened as
soon as core was empty, the well-behaved client's waits went back to 1-1.3 s every few seconds)."""

UNREPORTED_AFTER_S = 1.0
"""A narrowed gate also widens when no pickup has reported core's backlog for this long and none waits its turn,
at the next call picked up by a transport that cannot report it (HTTP): without it a front-end that had a gRPC
overload and then only HTTP calls would stay narrowed, as nothing would tell it the overload was over."""


class FairGate:
    """At most `limit` calls inside at once (0 = no limit); the others wait in their client's line, new lines first,
    then the others round-robin. `clock` (seconds, monotonic) times the rate at which waiting calls go in, for the
    bound.

    Per call: `try_enter()`, and when it says no, `await wait_turn(client, bound_s)`; then exactly one `leave()`
    once the call is done with the engines. The transport that can tell how long calls wait to be picked up says so
    with `follow_backlog(waited_s)`. Event-loop thread only.
    """

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.full_limit = limit
        self.limit = limit  # full_limit, or its NARROWED_SHARE while core holds a backlog
        self.inside = 0
        self.waiting = 0  # calls in the lines, cancelled ones not counted
        self.drain = DrainRate()  # how fast waiting calls go in, while some wait
        self._clock = clock
        self._lines: dict[Hashable, collections.deque[asyncio.Future[None]]] = {}
        # Clients with a line, next served first: those whose line has had no turn yet, then the others.
        self._new: collections.deque[Hashable] = collections.deque()
        self._rotation: collections.deque[Hashable] = collections.deque()
        self._let_in = 0  # calls that went in from a line, ever
        self._reported_at = -math.inf  # when follow_backlog last heard from a transport

    @property
    def narrowed(self) -> bool:
        return self.limit < self.full_limit

    def follow_backlog(self, waited_s: float) -> None:
        """A call was just picked up after waiting about `waited_s` in gRPC core: narrow the gate to NARROWED_SHARE
        of its limit from NARROW_AT_S on; widen it again at WIDEN_AT_S or less once no call waits its turn. No
        effect without a limit."""
        if not self.full_limit:
            return
        self._reported_at = self._clock()
        if waited_s >= NARROW_AT_S:
            self.limit = max(1, int(self.full_limit * NARROWED_SHARE))
        elif waited_s <= WIDEN_AT_S and self.narrowed and not self.waiting:
            self.limit = self.full_limit  # none waits: no one to let in

    def follow_unreported(self) -> None:
        """A call was just picked up by a transport that cannot tell how long it waited (HTTP): widen a narrowed
        gate when no transport has reported a wait for UNREPORTED_AFTER_S and none waits its turn."""
        if self.narrowed and not self.waiting and self._clock() - self._reported_at >= UNREPORTED_AFTER_S:
            self.limit = self.full_limit

    @property
    def clients_waiting(self) -> int:
        return len(self._new) + len(self._rotation)

    def try_enter(self) -> bool:
        """Go in at once when there is room and no one waits (the common case: no future, no await)."""
        if self.waiting or (self.limit and self.inside >= self.limit):
            return False
        self.inside += 1
        return True

    async def wait_turn(self, client: Hashable, bound_s: float = 0.0) -> None:
        """Wait in `client`'s line until let in. Raises Overloaded (reason QUEUE_WAIT, with a retry hint) when
        `client` has no call waiting yet and the new lines ahead of its own, one call each, would take longer than
        `bound_s` (> 0) to go in at the rate calls have been going in. A cancelled wait leaves the line, or gives
        its place back when it had just been let in."""
        self.drain.observe(self._clock(), self.waiting, self._let_in)
        line = self._lines.get(client)
        if line is None:
            ahead = len(self._new)
            wait_s = self.drain.wait_s(ahead) if bound_s > 0.0 and ahead else None
            if wait_s is not None and wait_s > bound_s:
                took = f"{wait_s:.3f} s" if math.isfinite(wait_s) else "forever (none has gone in lately)"
                raise Overloaded(
                    f"the server cannot start this call within {bound_s:.3f} s (max_queue_wait_ms): {ahead} other "
                    f"clients' first calls wait their turn, and would take {took} to go in",
                    reason=QUEUE_WAIT,
                    retry_after_s=min(wait_s - bound_s, LONGEST_RETRY_HINT_S),
                )
            line = self._lines[client] = collections.deque()
            self._new.append(client)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.append(turn)
        self.waiting += 1
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave()  # let in, but cancelled before it could go on: the place goes to the next
            else:
                turn.cancel()  # skipped when its line comes round
                self.waiting -= 1
            raise

    def leave(self) -> None:
        """A call that went in is done with the engines: let in the next ones, one per client in turn, new lines
        first."""
        self.inside -= 1
        new, rotation, lines = self._new, self._rotation, self._lines
        while (new or rotation) and (not self.limit or self.inside < self.limit):
            client = new.popleft() if new else rotation.popleft()
            line = lines[client]
            turn = line.popleft()
            while turn.cancelled() and line:
                turn = line.popleft()
            if line:
                rotation.append(client)  # back of the rotation: every other line goes first
            else:
                del lines[client]
            if not turn.cancelled():
                turn.set_result(None)
                self.inside += 1
                self.waiting -= 1
                self._let_in += 1

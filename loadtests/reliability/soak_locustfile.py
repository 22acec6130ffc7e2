"""Locust users for `make soak`: the project's load-test users (loadtests/locustfile.py: the same call mix,
workload and thresholds) held to a fixed total rate, so a soak runs at a chosen share of capacity.

    python -m locust -f loadtests/reliability/soak_locustfile.py --headless --host 127.0.0.1:50051 -u 16 -r 4 \\
        -t 10m --calls-per-second 40 --max-fail-ratio 0

Run it from the project root (`python -m locust` puts it on the import path).
"""

from __future__ import annotations

import time

from locust import events

# Importing the module (not its classes, so Locust sees one user class here) registers its command-line
# options, its workload loading and its failure thresholds.
import loadtests.locustfile as project_users


@events.init_command_line_parser.add_listener
def _soak_arguments(parser) -> None:
    parser.add_argument(
        "--calls-per-second",
        type=float,
        default=0.0,
        help="total calls per second of all users together (0 = as fast as the users go)",
    )


class PacedTranslatorUser(project_users.TranslatorUser):
    """TranslatorUser that starts its calls at a fixed pace: users / calls-per-second seconds apart
    (a call that takes longer is followed at once by the next). Only whole calls are reported: the
    streams' time-to-first-token entries are left out, so Locust's counts and percentiles are calls."""

    _next_start = 0.0

    def _report(self, name, started, length, error, item) -> None:
        if name.endswith("(first token)"):
            return
        super()._report(name, started, length, error, item)

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        rate = getattr(options, "calls_per_second", 0.0)
        if rate <= 0:
            return project_users.TranslatorUser.wait_time(self)
        interval = max(options.num_users, 1) / rate
        now = time.monotonic()
        if self._next_start == 0.0:
            self._next_start = now
        self._next_start = max(self._next_start + interval, now)
        return self._next_start - now

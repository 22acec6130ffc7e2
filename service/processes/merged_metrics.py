"""The supervisor's /metrics: every child process's series, read from its loopback endpoint at scrape time,
each with a `process` label ('engine', 'frontend-0', ..., 'supervisor')."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SCRAPE_TIMEOUT_S = 2.0


class MetricsSource(Protocol):
    """A child process as the merger sees it."""

    label: str
    """Its `process` label."""
    metrics_port: int
    """Its loopback metrics port; 0 while it has none (starting, restarting)."""


class ChildrenMetrics(Collector):
    """Every child's metrics, read from its loopback endpoint at scrape time, with a `process` label added."""

    def __init__(self, children: Sequence[MetricsSource]) -> None:
        self._children = children
        # The supervisor's own memory and CPU, in the same families as its children's (process="supervisor"):
        # one exposition must not hold two families of one name.
        self._own = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for family in self._own.collect():
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            into.samples.extend(
                sample._replace(labels={**sample.labels, "process": "supervisor"}) for sample in family.samples
            )
        for child in list(self._children):
            if not child.metrics_port:
                continue
            try:
                url = f"http://127.0.0.1:{child.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
                    text = response.read().decode("utf-8")
            except OSError:  # restarting: its series are back at the next scrape
                continue
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for sample in family.samples:
                    into.samples.append(sample._replace(labels={**sample.labels, "process": child.label}))
        yield from merged.values()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read at scrape time only

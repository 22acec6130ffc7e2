"""Load tests (Locust), the side-by-side benchmark (`attnserve bench`) and what they share: workloads, the
phrasebook corpus and model, the contender servers, the load generator and the report (docs/benchmarks.md);
the reliability runs live in `loadtests.reliability` (docs/reliability.md).
"""

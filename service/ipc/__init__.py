"""Serving from several processes: gRPC front-ends and one engine process, joined by Unix sockets.

- messages.py: the records that cross the boundary and their framing;
- engine_side.py: the engine process's endpoint, which hands front-ends' requests to the schedulers;
- frontend_side.py: a front-end's view of the engine: a registry of the served versions whose schedulers
  are proxies with the engine Scheduler's surface, so the dataplane runs unchanged;
- processes.py: `attnserve serve --frontends N`: the engine and front-end processes' main functions, and
  the supervisor that starts, watches, restarts and stops them and serves one /metrics for all of them.
"""

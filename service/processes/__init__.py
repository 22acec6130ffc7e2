"""`attnserve serve --frontends N`: one engine process, N gRPC front-end processes, and the supervisor over them.

- engine.py: the engine process's program; frontend.py: a front-end process's program; supervisor.py: the
  supervisor (with merged_metrics.py, its /metrics); __main__.py: how the supervisor starts a child.

The supervisor (the process started by `attnserve serve`) holds the gRPC port, starts the engine process and
then the front-ends, and waits for their exits:
- The engine process loads the repository, runs one engine per model version (exactly as a single-process
  server does) and serves the front-ends on a Unix socket in a private directory (service/ipc/engine_server.py).
- Each front-end binds the gRPC port with SO_REUSEPORT (the kernel spreads connections over them) and runs the
  gRPC API, validation, tokenizing and detokenizing, with the engine process behind an engine client
  (service/engine_client/socket_client.py).
- A process that exits on its own is started again (with a growing pause); meanwhile the front-ends answer
  UNAVAILABLE and report NOT_SERVING, and calls that were in the engine get UNAVAILABLE at once. An engine
  that fails its very first start (no model loads) stops the whole server with its exit status.
- SIGTERM/SIGINT: the front-ends drain first (no admitted call is lost), then the engine stops. SIGHUP goes
  to the engine, which scans the repository.
- /metrics on metrics_port is the supervisor's: every process's series, each with a `process` label
  ('engine', 'frontend-0', ...), read from the children's loopback endpoints when scraped.

Each child is `python -m service.processes ROLE RUNTIME_DIR SUPERVISOR_PID -- <the serve flags>`: it reads
the same flags and environment, so every process holds the same settings. It prints one JSON line on stdout once
ready, and stops when the supervisor dies, however it died.
"""

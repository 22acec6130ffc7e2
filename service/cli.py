"""The ``attnserve`` command: one entry point, each subcommand owned by the module that implements it.

Training and export need torch (the ``train`` extra); serving and the client never import it, so those
modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import sys

SUBCOMMANDS = {
    "train": ("export.cli", "train_main", "train a model on a bundled task or a TSV corpus"),
    "export": ("export.cli", "export_main", "export a trained run to the model repository (ONNX)"),
    "build-models": ("export.cli", "build_models_main", "train and export the default model repository"),
    "serve": ("service.server", "main", "serve a model repository over gRPC"),
    "translate": ("client.translate", "main", "translate with a running server or a local model version"),
    "bench": ("loadtests.bench", "main", "benchmark the serving contenders side by side (see docs/benchmarks.md)"),
}


def usage() -> str:
    lines = ["usage: attnserve COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'attnserve COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import importlib

    own_process = argv is None  # run as the program (its arguments from sys.argv), not called by another
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"attnserve: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            print(f"attnserve {command} needs the training extra: pip install 'attnserve[train]'", file=sys.stderr)
            return 2
        if exc.name == module_name.split(".")[0]:  # e.g. the serving image ships the server, not the client
            print(f"attnserve {command} is not installed here (no module {exc.name!r})", file=sys.stderr)
            return 2
        raise
    function = getattr(module, function_name)
    if command == "serve":  # only the program itself may start its process again on another malloc (allocator.py)
        return int(function(rest, own_process=own_process) or 0)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

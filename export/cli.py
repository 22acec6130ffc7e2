"""``attnserve train``, ``attnserve export`` and ``attnserve build-models``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from export.attention import ATTENTION_KINDS
from export.model import CELL_KINDS, ENCODER_KINDS, STYLES


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnserve train", description="Train an attention encoder-decoder.")
    p.add_argument("--task", required=True, help="dates, numbers, or tsv:PATH (source<TAB>target per line)")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, tokenizers, metrics)")
    p.add_argument("--attention", default="additive", choices=ATTENTION_KINDS)
    p.add_argument("--style", default="bahdanau", choices=STYLES,
                   help="bahdanau: attend with the previous state; luong: step, then attend, with input feeding")
    p.add_argument("--local-window", type=int, default=None, metavar="D",
                   help="Luong local-p attention with half-width D (Gaussian sigma = D/2) on top of the score")
    p.add_argument("--encoder", default="gru", choices=ENCODER_KINDS)
    p.add_argument("--decoder", default="gru", choices=CELL_KINDS)
    p.add_argument("--embedding", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--encoder-layers", type=int, default=1)
    p.add_argument("--decoder-layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=16, help="candidates per step in the exported graph (max beam)")
    p.add_argument("--tokenizer", default="", choices=["", "char", "word", "sentencepiece"],
                   help="default: char for bundled tasks, sentencepiece for TSV corpora")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--target-exact-match", type=float, default=1.01,
                   help="stop once validation exact match reaches this")
    p.add_argument("--max-pairs", type=int, default=None, help="read at most this many TSV pairs")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def train_main(argv: list[str]) -> int:
    from export.train import TrainConfig, train

    args = _train_parser().parse_args(argv)
    model = {k: getattr(args, k) for k in ("attention", "style", "local_window", "encoder", "decoder", "embedding",
                                          "hidden", "encoder_layers", "decoder_layers", "dropout", "top_k")}
    config = TrainConfig(task=args.task, out=args.out, seed=args.seed, tokenizer=args.tokenizer,
                         vocab_size=args.vocab_size, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         max_steps=args.max_steps, max_minutes=args.max_minutes, eval_every=args.eval_every,
                         patience=args.patience, target_exact_match=args.target_exact_match,
                         max_pairs=args.max_pairs, threads=args.threads, model=model)
    try:
        summary = train(config, resume=args.resume, progress=not args.quiet)
    except ValueError as exc:  # bad options and malformed corpora carry a message meant for the user
        print(f"attnserve train: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"test": summary["metrics"]["test"], "training": {
        k: v for k, v in summary["training"].items() if k != "history"}}, indent=2))
    return 0


def export_main(argv: list[str]) -> int:
    from export.onnx_export import ExportError, export_run

    p = argparse.ArgumentParser(prog="attnserve export", description="Export a run to an ONNX model repository.")
    p.add_argument("run", type=Path, help="run directory written by 'attnserve train'")
    p.add_argument("--repository", type=Path, default=Path("models"))
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, default=None, help="default: one past the highest existing version")
    p.add_argument("--quantize", choices=["int8"], default=None, help="dynamic int8 weights (CPU)")
    p.add_argument("--full-log-probs", action="store_true", help="also output the full log-probabilities")
    args = p.parse_args(argv)
    try:
        result = export_run(args.run, args.repository, args.name, version=args.version, quantize=args.quantize,
                            full_log_probs=args.full_log_probs)
    except (ExportError, FileNotFoundError) as exc:
        print(f"attnserve export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result.directory}")
    return 0


def build_models_main(argv: list[str]) -> int:
    from export.onnx_export import export_run
    from export.train import TrainConfig, train
    from export.zoo import DEFAULT_MODELS, is_up_to_date

    p = argparse.ArgumentParser(prog="attnserve build-models", description="Build the default model repository.")
    p.add_argument("--repository", type=Path, default=Path("models"))
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--only", nargs="*", default=None, help="names to build (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = p.parse_args(argv)
    failures = []
    for entry in DEFAULT_MODELS:
        if args.only and entry.name not in args.only:
            continue
        if not args.force and is_up_to_date(args.repository, entry):
            print(f"{entry.name}: up to date")
            continue
        started = time.monotonic()
        run_dir = args.runs / entry.name
        config = TrainConfig(task=entry.task, out=run_dir, model=dict(entry.model), **entry.training)
        summary = train(config, resume=False)
        build = {"fingerprint": entry.fingerprint(), "description": entry.description}
        result = export_run(run_dir, args.repository, entry.name, extra={"build": build})
        document = result.model_json
        exact = summary["metrics"]["test"]["exact_match"]
        print(f"{entry.name}: test exact match {exact:.4f} (bar {entry.bar}), "
              f"{summary['training']['seconds']:.0f}s training, {time.monotonic() - started:.0f}s with export, "
              f"v{document['version']} in {args.repository}")
        if exact < entry.bar:
            failures.append(f"{entry.name} reached {exact:.4f} < {entry.bar}")
    if failures:
        print("below the accuracy bar: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0

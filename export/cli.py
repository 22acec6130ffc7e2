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
    p.add_argument(
        "--style",
        default="bahdanau",
        choices=STYLES,
        help="bahdanau: attend with the previous state; luong: step, then attend, with input feeding",
    )
    p.add_argument(
        "--local-window",
        type=int,
        default=None,
        metavar="D",
        help="Luong local-p attention with half-width D (Gaussian sigma = D/2) on top of the score",
    )
    p.add_argument("--encoder", default="gru", choices=ENCODER_KINDS)
    p.add_argument("--decoder", default="gru", choices=CELL_KINDS)
    p.add_argument("--embedding", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--encoder-layers", type=int, default=1)
    p.add_argument("--decoder-layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=16, help="candidates per step in the exported graph (max beam)")
    p.add_argument(
        "--tokenizer",
        default="",
        choices=["", "char", "word", "sentencepiece"],
        help="default: char for bundled tasks, sentencepiece for TSV corpora",
    )
    p.add_argument(
        "--source-normalization",
        default="",
        metavar="SPEC",
        help="the source tokenizer's input normalisation (docs/model-format.md): 'none', 'nfc', or rule=value "
        "items, e.g. 'unicode=NFKC,ignorables=drop,case=fold,whitespace=fold'; default: the task's (dates, "
        "numbers), else NFKC + ignorables dropped + whitespace folded for char and word, none for sentencepiece",
    )
    p.add_argument(
        "--target-normalization",
        default="",
        metavar="SPEC",
        help="the target tokenizer's (what the model writes); default: the task's, else NFC + whitespace folded "
        "for char and word, none for sentencepiece",
    )
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument(
        "--target-exact-match", type=float, default=1.01, help="stop once validation exact match reaches this ..."
    )
    p.add_argument("--target-evaluations", type=int, default=1, help="... on this many consecutive evaluations ...")
    p.add_argument("--min-steps", type=int, default=0, help="... and no earlier than this step")
    p.add_argument("--valid-limit", type=int, default=2000, help="validation examples decoded per evaluation")
    p.add_argument("--max-pairs", type=int, default=None, help="read at most this many TSV pairs")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def train_main(argv: list[str]) -> int:
    from export.train import TrainConfig, train

    args = _train_parser().parse_args(argv)
    model = {
        k: getattr(args, k)
        for k in (
            "attention",
            "style",
            "local_window",
            "encoder",
            "decoder",
            "embedding",
            "hidden",
            "encoder_layers",
            "decoder_layers",
            "dropout",
            "top_k",
        )
    }
    config = TrainConfig(
        task=args.task,
        out=args.out,
        seed=args.seed,
        tokenizer=args.tokenizer,
        source_normalization=args.source_normalization,
        target_normalization=args.target_normalization,
        vocab_size=args.vocab_size,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        eval_every=args.eval_every,
        patience=args.patience,
        target_exact_match=args.target_exact_match,
        target_evaluations=args.target_evaluations,
        min_steps=args.min_steps,
        valid_limit=args.valid_limit,
        max_pairs=args.max_pairs,
        threads=args.threads,
        model=model,
    )
    try:
        summary = train(config, resume=args.resume, progress=not args.quiet)
    except ValueError as exc:  # bad options and malformed corpora carry a message meant for the user
        print(f"attnserve train: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "test": summary["metrics"]["test"],
                "training": {k: v for k, v in summary["training"].items() if k != "history"},
            },
            indent=2,
        )
    )
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
        result = export_run(
            args.run,
            args.repository,
            args.name,
            version=args.version,
            quantize=args.quantize,
            full_log_probs=args.full_log_probs,
        )
    except (ExportError, FileNotFoundError) as exc:
        print(f"attnserve export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result.directory}")
    return 0


def build_models_main(argv: list[str]) -> int:
    from export.zoo import DEFAULT_MODELS, BuildFailed, build, is_up_to_date

    p = argparse.ArgumentParser(
        prog="attnserve build-models",
        description="Rebuild the default model repository (shipped in models/): train, export, check each model on "
        "fresh inputs, and install it only if it meets its bar.",
    )
    p.add_argument("--repository", type=Path, default=Path("models"))
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--only", nargs="*", default=None, help="names to build (default: all)")
    p.add_argument(
        "--if-changed",
        action="store_true",
        help="skip a model whose recipe fingerprint matches the version in the repository",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the recipe's, 1)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {entry.name for entry in DEFAULT_MODELS})
    if unknown:
        p.error(f"no default model named {unknown}; the defaults are {[entry.name for entry in DEFAULT_MODELS]}")
    failures = []
    for entry in DEFAULT_MODELS:
        if args.only and entry.name not in args.only:
            continue
        if args.if_changed and is_up_to_date(args.repository, entry):
            print(f"{entry.name}: up to date")
            continue
        started = time.monotonic()
        try:
            document = build(entry, args.repository, args.runs, threads=args.threads)
        except BuildFailed as exc:
            failures.append(str(exc))
            print(f"attnserve build-models: {exc}", file=sys.stderr)
            continue
        greedy = (document.acceptance or {})["greedy"]
        print(
            f"{entry.name}: installed as {args.repository / entry.name / str(document.version)} after "
            f"{time.monotonic() - started:.0f}s: greedy {greedy['plain']['exact_match']:.4f} exact on plain and "
            f"{greedy['as_written']['exact_match']:.4f} on as-written fresh inputs (bar {entry.bar} in every group), "
            f"test split {document.metrics['test']['exact_match']:.4f}"
        )
    if failures:
        print(f"attnserve build-models: {len(failures)} default model(s) missed their bar", file=sys.stderr)
        return 1
    return 0

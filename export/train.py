"""Training: tasks to tensors, the teacher-forced loop, validation, checkpoints, early stopping and resume.

A run directory holds everything needed to export or resume::

    runs/NAME/
      run.json                 # task, model and training configuration, data description
      source.tokenizer.json    # the tokenizers, saved once and never retrained on resume
      target.tokenizer.json
      last.pt                  # model + optimiser + RNG state, for --resume
      best.pt                  # best validation exact match so far
      metrics.json             # test-split metrics of best.pt, written at the end
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from export.data import Pair, Splits, load_tsv, make_dates, make_numbers
from export.model import Architecture, Seq2Seq
from service.runtime.normalization import IDENTITY, Normalization
from service.runtime.tokenizers import BOS, EOS, PAD, Tokenizer, load_tokenizer, train_tokenizer

#: The input normalisation of a user's corpus (tsv:PATH) with a char or word tokenizer: compatibility forms
#: (full-width characters, no-break and other fixed-width spaces) as their plain forms, invisible characters
#: (bidi marks, zero-width spaces, byte order marks) dropped, runs of whitespace as one space.
CORPUS_SOURCE_NORMALIZATION = Normalization(unicode="NFKC", ignorables="drop", whitespace="fold")
#: ... and of its targets, which is what the model learns to write: NFC (NFKC would rewrite the text's own
#: full-width punctuation, and dropping ignorables its zero-width non-joiners), runs of whitespace as one space.
CORPUS_TARGET_NORMALIZATION = Normalization(unicode="NFC", whitespace="fold")


@dataclass
class TrainConfig:
    """How to train one model. Defaults suit the small bundled tasks on a CPU."""

    task: str  # 'dates', 'numbers' or 'tsv:PATH'
    out: Path
    seed: int = 13
    tokenizer: str = ""  # '' = 'char' for bundled tasks, 'sentencepiece' for TSV corpora
    # Input normalisation of each tokenizer ('' = the task's, else the kind's default; see `normalizations`),
    # as `Normalization.parse` reads it: 'none', 'nfc', or 'unicode=NFKC,ignorables=drop,whitespace=fold', ...
    source_normalization: str = ""
    target_normalization: str = ""
    vocab_size: int = 8000  # for 'sentencepiece' and 'word' tokenizers
    batch_size: int = 128
    learning_rate: float = 3e-3
    max_steps: int = 20000
    max_minutes: float = 30.0  # wall-clock budget; training stops at the first of steps/minutes
    eval_every: int = 250  # steps between validations
    patience: int = 8  # validations without improvement before stopping
    lr_patience: int = 2  # validations without improvement before the learning rate is halved
    target_exact_match: float = 1.01  # stop once validation exact match reaches this (>1 = never) ...
    target_evaluations: int = 1  # ... on this many consecutive evaluations ...
    min_steps: int = 0  # ... and no earlier than this step
    valid_limit: int = 2000  # validation examples decoded at each evaluation
    max_pairs: int | None = None  # cap on TSV pairs read
    data_options: dict = field(default_factory=dict)  # keyword arguments of the task's generator
    model: dict = field(default_factory=dict)  # Architecture fields other than vocabulary sizes
    # torch intra-op threads. One by default: these models are too small to gain from more, and an OpenMP
    # pool that shares its cores with another busy process (a server, a test client) slows down ~40x.
    threads: int = 1

    def to_dict(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


# --------------------------------------------------------------------------------------------------- data
def load_task(task: str, seed: int, data_options: dict | None = None, max_pairs: int | None = None) -> Splits:
    """The train/valid/test splits of a bundled task or a user's TSV corpus (``tsv:PATH``)."""
    options = dict(data_options or {})
    if task == "dates":
        return make_dates(seed=seed, **options)
    if task == "numbers":
        return make_numbers(seed=seed, **options)
    if task.startswith("tsv:"):
        return load_tsv(Path(task[4:]), seed=seed, max_pairs=max_pairs, **options)
    raise ValueError(f"unknown task {task!r}: use 'dates', 'numbers' or 'tsv:PATH' (a source<TAB>target file)")


def encode_pairs(pairs: list[Pair], source: Tokenizer, target: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """Token ids per pair: source ends with eos; target is the bare ids (bos/eos added when batching)."""
    return [(source.encode(p.source) + [EOS], target.encode(p.target)) for p in pairs]


def make_batch(items: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    """Pad a list of (source, target) id lists into ``source, lengths, target_in, target_out`` tensors."""
    batch = len(items)
    src_len = max(len(s) for s, _ in items)
    tgt_len = max(len(t) for _, t in items) + 1
    source = torch.full((batch, src_len), PAD, dtype=torch.long)
    target_in = torch.full((batch, tgt_len), PAD, dtype=torch.long)
    target_out = torch.full((batch, tgt_len), PAD, dtype=torch.long)
    lengths = torch.empty(batch, dtype=torch.long)
    for row, (s, t) in enumerate(items):
        source[row, : len(s)] = torch.tensor(s)
        lengths[row] = len(s)
        target_in[row, : len(t) + 1] = torch.tensor([BOS] + t)
        target_out[row, : len(t) + 1] = torch.tensor(t + [EOS])
    return source, lengths, target_in, target_out


def batches(items: list, batch_size: int, rng: random.Random) -> Iterator[list]:
    """Endless shuffled batches; examples of similar source length are grouped to cut padding."""
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        chunk = batch_size * 32
        for start in range(0, len(order), chunk):
            block = sorted(order[start : start + chunk], key=lambda i: len(items[i][0]))
            group = [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
            rng.shuffle(group)
            for indices in group:
                yield [items[i] for i in indices]


# --------------------------------------------------------------------------------------------------- decode
@torch.no_grad()
def greedy_ids(model: Seq2Seq, items: list[list[int]], *, batch_size: int = 256) -> list[list[int]]:
    """Greedy outputs (eos excluded) for source id lists, batched, in the input order."""
    model.eval()
    # Batches are made on the CPU; a model trained on a GPU decodes there too.
    device = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in items]
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        source, lengths, _, _ = make_batch([(items[i], []) for i in chunk])
        outputs, _ = model.greedy(source.to(device), lengths.to(device))
        for index, tokens in zip(chunk, outputs, strict=False):
            results[index] = tokens
    return results


def evaluate(model: Seq2Seq, pairs: list[Pair], source: Tokenizer, target: Tokenizer, limit: int | None = None) -> dict:
    """Exact match, BLEU and chrF (sacrebleu) of greedy decoding on ``pairs``."""
    import sacrebleu

    pairs = pairs[:limit] if limit else pairs
    hypotheses = [target.decode(ids) for ids in greedy_ids(model, [source.encode(p.source) + [EOS] for p in pairs])]
    # What the model can write is the target's normalised form (a word tokenizer's 'Hi , you !').
    references = [target.normalize(p.target) for p in pairs]
    exact = sum(h == r for h, r in zip(hypotheses, references, strict=False)) / max(len(pairs), 1)
    return {
        "exact_match": round(exact, 5),
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 3),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 3),
        "examples": len(pairs),
    }


# --------------------------------------------------------------------------------------------------- training
def normalizations(config: TrainConfig, splits: Splits, kind: str) -> tuple[Normalization, Normalization]:
    """The (source, target) normalisations of a run's tokenizers: the configuration's when given, else the task's
    (a generated task declares the one it was made for), else the tokenizer kind's default (SentencePiece: none
    but its own; char and word: CORPUS_SOURCE_NORMALIZATION and CORPUS_TARGET_NORMALIZATION)."""
    if kind == "sentencepiece":
        defaults = (IDENTITY, IDENTITY)
    else:
        defaults = (CORPUS_SOURCE_NORMALIZATION, CORPUS_TARGET_NORMALIZATION)
    chosen = []
    for given, declared, default in (
        (config.source_normalization, splits.source_normalization, defaults[0]),
        (config.target_normalization, splits.target_normalization, defaults[1]),
    ):
        chosen.append(Normalization.parse(given) if given else declared or default)
    return chosen[0], chosen[1]


def _tokenizers(config: TrainConfig, splits: Splits, out: Path, resume: bool) -> tuple[Tokenizer, Tokenizer]:
    kind = config.tokenizer or ("sentencepiece" if config.task.startswith("tsv:") else "char")
    paths = out / "source.tokenizer.json", out / "target.tokenizer.json"
    if resume and all(p.exists() for p in paths):
        return load_tokenizer(kind, paths[0]), load_tokenizer(kind, paths[1])
    vocab = None if kind == "char" else config.vocab_size
    source_normalization, target_normalization = normalizations(config, splits, kind)
    source = train_tokenizer(
        kind, [p.source for p in splits.train], vocab_size=vocab, normalization=source_normalization
    )
    target = train_tokenizer(
        kind, [p.target for p in splits.train], vocab_size=vocab, normalization=target_normalization
    )
    source.save(paths[0])
    target.save(paths[1])
    return source, target


def _architecture(config: TrainConfig, source: Tokenizer, target: Tokenizer, encoded: list) -> Architecture:
    longest_source = max(len(s) for s, _ in encoded)
    longest_target = max(len(t) for _, t in encoded) + 1
    options = dict(config.model)
    # Leave headroom over the longest training example for slightly longer real inputs.
    options.setdefault("max_source_len", int(math.ceil(longest_source * 1.25)) + 2)
    options.setdefault("max_target_len", int(math.ceil(longest_target * 1.25)) + 2)
    # A tiny target vocabulary (digits and '-' for dates) cannot offer more candidates than it has tokens.
    options["top_k"] = min(int(options.get("top_k", 16)), target.vocab_size)
    return Architecture(source_vocab=source.vocab_size, target_vocab=target.vocab_size, **options)


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[Seq2Seq, dict]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model = Seq2Seq(Architecture(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    return model, payload


@dataclass
class _Progress:
    """Where a training run stands; saved in every checkpoint so that a resumed run continues exactly."""

    step: int = 0
    best: float = -1.0  # best validation exact match so far
    stale: int = 0  # evaluations since the best one improved
    on_target: int = 0  # consecutive evaluations at or above the target
    elapsed_before: float = 0.0  # seconds trained by the runs this one resumes
    history: list[dict] = field(default_factory=list)


class _TrainingRun:
    """The model, its optimizer and learning-rate schedule, and the run's progress and random state."""

    def __init__(self, config: TrainConfig, architecture: Architecture, device: torch.device) -> None:
        self.config, self.architecture = config, architecture
        self.model = Seq2Seq(architecture).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        # Halving the rate when validation stalls turns the noisy plateau of a constant rate into convergence.
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=0.5, patience=config.lr_patience, min_lr=1e-5
        )
        self.loss_fn = nn.NLLLoss(ignore_index=PAD, reduction="sum")
        self.rng = random.Random(config.seed)
        self.progress = _Progress()
        self.started = time.monotonic()  # set again when the training loop starts, after a resume

    @property
    def seconds(self) -> float:
        return self.progress.elapsed_before + time.monotonic() - self.started

    def resume(self, path: Path) -> None:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.plateau.load_state_dict(payload["plateau"])
        self.progress = _Progress(
            step=payload["step"],
            best=payload["best"],
            stale=payload["stale"],
            on_target=payload.get("on_target", 0),
            elapsed_before=payload["elapsed"],
            history=payload["history"],
        )
        self.rng.setstate(payload["python_rng"])
        torch.set_rng_state(payload["torch_rng"])

    def checkpoint(self, path: Path) -> None:
        progress = self.progress
        _save(
            path,
            {
                "model": self.model.state_dict(),
                "model_config": self.architecture.to_dict(),
                "optimizer": self.optimizer.state_dict(),
                "plateau": self.plateau.state_dict(),
                "step": progress.step,
                "best": progress.best,
                "stale": progress.stale,
                "on_target": progress.on_target,
                "elapsed": self.seconds,
                "history": progress.history,
                "python_rng": self.rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "train_config": self.config.to_dict(),
            },
        )

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[float, int]:
        """One optimizer step on one batch; returns the loss per target token and the number of target tokens."""
        self.model.train()
        source, lengths, target_in, target_out = batch
        log_probs = self.model(source, lengths, target_in)
        n_tokens = int((target_out != PAD).sum())
        loss = self.loss_fn(log_probs.reshape(-1, log_probs.shape[-1]), target_out.reshape(-1)) / n_tokens
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.progress.step += 1
        return loss.item(), n_tokens

    def record_evaluation(self, metrics: dict, loss: float, best_path: Path) -> None:
        """Log an evaluation, step the schedule, and keep the best checkpoint."""
        progress = self.progress
        progress.history.append(
            {
                "step": progress.step,
                "seconds": round(self.seconds, 1),
                "loss": round(loss, 4),
                "lr": self.optimizer.param_groups[0]["lr"],
                **metrics,
            }
        )
        exact_match = metrics["exact_match"]
        self.plateau.step(exact_match)
        # On ties the later checkpoint wins: it has trained longer at the same validation score.
        if exact_match >= progress.best:
            progress.stale = 0 if exact_match > progress.best else progress.stale + 1
            progress.best = exact_match
            self.checkpoint(best_path)
        else:
            progress.stale += 1
        # One lucky evaluation is not convergence: the target must hold on consecutive evaluations, so
        # that where training stops depends little on the last bits of the CPU's floating-point results.
        progress.on_target = progress.on_target + 1 if exact_match >= self.config.target_exact_match else 0

    def stop_reason(self, deadline: float) -> str | None:
        """Why training should stop after this evaluation, or None to go on."""
        config, progress = self.config, self.progress
        if progress.on_target >= config.target_evaluations and progress.step >= config.min_steps:
            return "target_reached"
        if progress.stale >= config.patience and progress.step >= config.min_steps:
            return "early_stopping"
        if time.monotonic() > deadline:
            return "time_budget"
        return None


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a model into ``config.out``; returns the summary also written to run.json."""
    from tqdm import tqdm

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    splits = load_task(config.task, config.seed, config.data_options, config.max_pairs)
    source_tok, target_tok = _tokenizers(config, splits, out, resume)
    train_items = encode_pairs(splits.train, source_tok, target_tok)
    run = _TrainingRun(config, _architecture(config, source_tok, target_tok, train_items), device)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume and last_path.exists():
        run.resume(last_path)

    run.started = time.monotonic()
    deadline = run.started + config.max_minutes * 60.0 - run.progress.elapsed_before
    stream = batches(train_items, config.batch_size, run.rng)
    # Skip the batches a resumed run already consumed so it continues the same data order.
    for _ in range(run.progress.step):
        next(stream)
    # Redraw at most every 10 s when the output is a log file rather than a terminal.
    bar = tqdm(
        total=config.max_steps,
        initial=run.progress.step,
        disable=not progress,
        desc=out.name,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    tokens_since, clock = 0, time.monotonic()
    stop_reason = "max_steps"
    while run.progress.step < config.max_steps:
        loss, n_tokens = run.train_step(tuple(t.to(device) for t in make_batch(next(stream))))
        step = run.progress.step
        tokens_since += n_tokens
        bar.update(1)
        if step % 20 == 0:
            now = time.monotonic()
            bar.set_postfix(
                loss=f"{loss:.3f}", tok_s=f"{tokens_since / (now - clock):.0f}", best=f"{run.progress.best:.4f}"
            )
            tokens_since, clock = 0, now
        if step % config.eval_every == 0 or step == config.max_steps or time.monotonic() > deadline:
            metrics = evaluate(run.model, splits.valid, source_tok, target_tok, limit=config.valid_limit)
            bar.write(f"step {step}: valid exact match {metrics['exact_match']:.4f}, chrF {metrics['chrf']:.1f}")
            run.record_evaluation(metrics, loss, best_path)
            run.checkpoint(last_path)
            reason = run.stop_reason(deadline)
            if reason is not None:
                stop_reason = reason
                break
    bar.close()
    if not best_path.exists():
        run.checkpoint(best_path)
    best_model, _ = load_checkpoint(best_path)
    test_metrics = evaluate(best_model, splits.test, source_tok, target_tok)
    summary = {
        "train_config": config.to_dict(),
        "model_config": run.architecture.to_dict(),
        "data": splits.description,
        "tokenizer": source_tok.kind,
        "normalization": {
            "source": source_tok.normalization.to_document(),
            "target": target_tok.normalization.to_document(),
        },
        "training": {
            "steps": run.progress.step,
            "seconds": round(run.seconds, 1),
            "stop_reason": stop_reason,
            "best_valid_exact_match": run.progress.best,
            "history": run.progress.history,
        },
        "metrics": {"test": test_metrics},
    }
    (out / "run.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def train_config_from_dict(data: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})

"""Export a trained run to a model repository version and prove the ONNX graphs decode as PyTorch did.

The TorchScript-based exporter (``dynamo=False``) is chosen on purpose: for these small recurrent graphs it
gives plain standard ops (GRU/LSTM, Gemm, TopK, Softmax) with dynamic batch and source axes, and every
export is checked for op types and for parity at shapes other than the export dummy.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.model import DecoderStepGraph, EncoderGraph, Seq2Seq
from export.train import encode_pairs, greedy_ids, load_checkpoint, load_task, train_config_from_dict
from service.runtime.model import OnnxStepModel
from service.runtime.model_format import (
    DecoderGraph,
    GraphFile,
    Limits,
    ModelDocument,
    SpecialTokens,
    StateTensors,
    TokenizerFile,
    Tokenizers,
)
from service.runtime.repository import is_valid_model_name, next_version
from service.runtime.tokenizers import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, Tokenizer, load_tokenizer

OPSET = 17
# Standard ONNX operators our graphs may contain; anything else (ATen fallbacks, custom domains) is refused.
ALLOWED_OPS = frozenset(
    "Abs Add And Cast Clip Concat Constant ConstantOfShape Cos Div Equal Expand Gather GatherElements Gemm "
    "Greater GreaterOrEqual GRU Identity If LSTM LayerNormalization Less LessOrEqual LogSoftmax MatMul Max Min "
    "Mul Neg Not Or Pow Range ReduceL2 ReduceMax ReduceMean ReduceSum Relu Reshape Shape Sigmoid Sin Slice "
    "Softmax Softplus Split Sqrt Squeeze Sub Tanh TopK Transpose Unsqueeze Where "
    "DynamicQuantizeLinear DynamicQuantizeMatMul MatMulInteger QuantizeLinear DequantizeLinear".split()
)
# Log probabilities are compared relative to their size beyond 1: a confident model's unlikely candidates sit
# at -20 or -30, where float32 kernels that differ in summation order differ by a few 1e-4 in absolute terms.
PARITY_TOLERANCE = 1e-4
# Some trained models amplify float32 rounding over the parity check's random inputs and decoder steps: PyTorch's
# own float32 result then differs from the same model computed in float64 by more than PARITY_TOLERANCE, and no
# float32 implementation can agree with it more closely. The tolerance is therefore the larger of
# PARITY_TOLERANCE and this many times that float32 error, measured on the same inputs; an export bug differs by
# orders of magnitude more.
FLOAT32_ERROR_FACTOR = 4.0


class ExportError(RuntimeError):
    """The export or its verification failed; the message says which check and by how much."""


@dataclass
class ExportResult:
    directory: Path
    document: ModelDocument


def _export_graph(
    module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str], dynamic_axes: dict
) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about traced shape arithmetic that our
        # dynamic-shape parity checks below cover; keep the export output readable.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,  # type: ignore[arg-type]  # a file-like object works (torch's stub names paths only)
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def op_types(model_bytes: bytes) -> list[str]:
    graph = onnx.load_from_string(model_bytes).graph
    ops: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        for node in g.node:
            ops.add(
                node.op_type if node.domain in ("", "ai.onnx", "com.microsoft") else f"{node.domain}.{node.op_type}"
            )
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)

    walk(graph)
    return sorted(ops)


def export_graphs(model: Seq2Seq, *, full_log_probs: bool = False) -> tuple[bytes, bytes, DecoderGraph]:
    """ONNX bytes of the encoder and the decoder step, plus the ``decoder`` section of model.json."""
    model.eval()
    memory_names = model.memory_names
    state_in = [f"state_{n}" for n in model.state_names]
    state_out = [f"next_{n}" for n in model.state_names]
    state_init = [f"init_{n}" for n in model.state_names]
    # The dummy deliberately has unequal lengths; parity is then checked at other shapes.
    first_real_token = UNK + 1
    source = torch.tensor([[first_real_token] * 4 + [EOS], [first_real_token] * 2 + [EOS, PAD, PAD]], dtype=torch.long)
    lengths = torch.tensor([5, 3], dtype=torch.long)
    # The exporter restores each wrapper's train/eval mode when it is done, and that mode propagates to the
    # model inside: wrappers built in the default training mode would switch dropout back on afterwards.
    encoder_graph = EncoderGraph(model).eval()
    decoder_graph = DecoderStepGraph(model, full_log_probs=full_log_probs).eval()
    encoder_bytes = _export_graph(
        encoder_graph,
        (source, lengths),
        ["source_ids", "source_lengths"],
        memory_names + state_init,
        {
            "source_ids": {0: "batch", 1: "source_len"},
            "source_lengths": {0: "batch"},
            **{n: {0: "batch", 1: "source_len"} for n in memory_names},
            **{n: {0: "batch"} for n in state_init},
        },
    )
    with torch.no_grad():
        encoded = encoder_graph(source, lengths)
    tokens = torch.tensor([BOS, BOS], dtype=torch.long)
    outputs = ["topk_log_probs", "topk_ids", "attention"] + state_out + (["log_probs"] if full_log_probs else [])
    decoder_bytes = _export_graph(
        decoder_graph,
        (tokens, lengths, *encoded),
        ["tokens", "source_lengths"] + memory_names + state_in,
        outputs,
        {
            "tokens": {0: "rows"},
            "source_lengths": {0: "rows"},
            **{n: {0: "rows", 1: "source_len"} for n in memory_names},
            **{n: {0: "rows"} for n in state_in},
            "topk_log_probs": {0: "rows"},
            "topk_ids": {0: "rows"},
            "attention": {0: "rows", 1: "source_len"},
            **{n: {0: "rows"} for n in state_out},
            **({"log_probs": {0: "rows"}} if full_log_probs else {}),
        },
    )
    for which, data in (("encoder", encoder_bytes), ("decoder", decoder_bytes)):
        unexpected = set(op_types(data)) - ALLOWED_OPS
        if unexpected:
            raise ExportError(f"{which} graph contains unexpected operator types {sorted(unexpected)}")
    decoder_section = DecoderGraph(
        file="decoder.onnx",
        memory=tuple(memory_names),
        state=tuple(
            StateTensors(input=i, output=o, init=n) for i, o, n in zip(state_in, state_out, state_init, strict=True)
        ),
        full_log_probs=full_log_probs,
    )
    return encoder_bytes, decoder_bytes, decoder_section


# --------------------------------------------------------------------------------------------------- parity
def _pad(items: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(x) for x in items], dtype=np.int64)
    ids = np.zeros((len(items), int(lengths.max())), dtype=np.int64)
    for row, x in enumerate(items):
        ids[row, : len(x)] = x
    return ids, lengths


def ort_greedy(
    step_model: OnnxStepModel, sources: list[list[int]], max_len: int, batch_size: int = 256
) -> list[list[int]]:
    """Greedy decoding with onnxruntime alone (numpy), in input order; eos excluded."""
    results: list[list[int]] = [[] for _ in sources]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, lengths = _pad([sources[i] for i in chunk])
        encoded = step_model.encode(ids, lengths)
        tokens = np.full(len(chunk), BOS, dtype=np.int64)
        state = encoded.state
        done = np.zeros(len(chunk), dtype=bool)
        outputs: list[list[int]] = [[] for _ in chunk]
        for _ in range(max_len):
            step = step_model.step(tokens, lengths, encoded.memory, state)
            tokens = step.topk_ids[:, 0].astype(np.int64)
            state = step.state
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    if token == EOS:
                        done[row] = True
                    else:
                        outputs[row].append(token)
            if done.all():
                break
        for index, tokens_out in zip(chunk, outputs, strict=False):
            results[index] = tokens_out
    return results


def step_parity(
    model: Seq2Seq,
    step_model: OnnxStepModel,
    sources: list[list[int]],
    steps: int = 4,
    *,
    float64: Seq2Seq | None = None,
) -> dict:
    """Largest |ORT - torch| over a few decoder steps fed with the same tokens, for one padded batch; with
    `float64` (the model in double precision), also the largest |torch float32 - torch float64|
    (`float32_log_probs_relative`, `float32_attention`): how much float32 rounding alone moves the results."""
    ids, lengths = _pad(sources)
    with torch.no_grad():
        enc = model.encode(torch.from_numpy(ids), torch.from_numpy(lengths))
        exact = float64.encode(torch.from_numpy(ids), torch.from_numpy(lengths)) if float64 is not None else None
    ort_enc = step_model.encode(ids, lengths)
    worst = {
        "log_probs": 0.0,
        "log_probs_relative": 0.0,
        "attention": 0.0,
        "state": 0.0,
        "memory": 0.0,
        "float32_log_probs_relative": 0.0,
        "float32_attention": 0.0,
    }
    state_x: dict[str, torch.Tensor] = exact.state if exact is not None else {}
    torch_memory = [enc.memory] + ([enc.keys] if enc.keys is not None else [])
    for name, value in zip(step_model.memory_names, torch_memory, strict=False):
        worst["memory"] = max(worst["memory"], float(np.abs(ort_enc.memory[name] - value.numpy()).max()))
    state_t, state_o = enc.state, ort_enc.state
    rng = np.random.default_rng(len(sources) * 1000 + ids.shape[1])
    tokens = np.full(len(sources), BOS, dtype=np.int64)
    for _ in range(steps):
        with torch.no_grad():
            log_probs, weights, state_t = model.step(
                torch.from_numpy(tokens), torch.from_numpy(lengths), enc.memory, enc.keys, state_t
            )
            if float64 is not None and exact is not None:
                log_probs_x, weights_x, state_x = float64.step(
                    torch.from_numpy(tokens), torch.from_numpy(lengths), exact.memory, exact.keys, state_x
                )
                top_x = torch.topk(log_probs_x, step_model.top_k, dim=-1).values.numpy()
                top_32 = torch.topk(log_probs, step_model.top_k, dim=-1).values.double().numpy()
                worst["float32_log_probs_relative"] = max(
                    worst["float32_log_probs_relative"],
                    float((np.abs(top_32 - top_x) / np.maximum(1.0, np.abs(top_x))).max()),
                )
                worst["float32_attention"] = max(
                    worst["float32_attention"], float(np.abs(weights.double().numpy() - weights_x.numpy()).max())
                )
        out = step_model.step(tokens, lengths, ort_enc.memory, state_o)
        top_t = torch.topk(log_probs, step_model.top_k, dim=-1).values.numpy()
        difference = np.abs(out.topk_log_probs - top_t)
        worst["log_probs"] = max(worst["log_probs"], float(difference.max()))
        worst["log_probs_relative"] = max(
            worst["log_probs_relative"], float((difference / np.maximum(1.0, np.abs(top_t))).max())
        )
        worst["attention"] = max(worst["attention"], float(np.abs(out.attention - weights.numpy()).max()))
        for name, value in zip(model.state_names, (state_t[n] for n in model.state_names), strict=False):
            worst["state"] = max(worst["state"], float(np.abs(out.state[f"state_{name}"] - value.numpy()).max()))
        state_o = out.state
        tokens = rng.integers(4, model.config.target_vocab, size=len(sources)).astype(np.int64)
    return worst


@dataclass
class Verification:
    parity: dict  # the figures recorded in model.json
    greedy: list[list[int]]  # onnxruntime's greedy outputs for the test sources (equal to PyTorch's)


def verify(model: Seq2Seq, directory: Path, test_sources: list[list[int]], max_source_len: int) -> Verification:
    """Parity of the exported graphs in ``directory`` against ``model`` (raises ExportError when off)."""
    model.eval()
    step_model = OnnxStepModel(ModelDocument.read(directory), directory, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    shapes = [(1, 1), (1, max_source_len), (3, 9), (7, 23), (16, min(40, max_source_len))]
    float64 = copy.deepcopy(model).double().eval()
    worst: dict[str, float] = {}
    for batch, length in shapes:
        length = max(1, min(length, max_source_len))
        sources = []
        for row in range(batch):
            n = length if row == 0 else int(rng.integers(1, length + 1))
            sources.append([int(t) for t in rng.integers(4, model.config.source_vocab, size=n - 1)] + [EOS])
        for key, value in step_parity(model, step_model, sources, float64=float64).items():
            worst[key] = max(worst.get(key, 0.0), value)
    tolerance = {
        "log_probs_relative": max(PARITY_TOLERANCE, FLOAT32_ERROR_FACTOR * worst["float32_log_probs_relative"]),
        "attention": max(PARITY_TOLERANCE, FLOAT32_ERROR_FACTOR * worst["float32_attention"]),
    }
    if worst["log_probs_relative"] > tolerance["log_probs_relative"] or worst["attention"] > tolerance["attention"]:
        raise ExportError(f"onnxruntime differs from PyTorch beyond {tolerance}: {worst}")
    torch_out = greedy_ids(model, test_sources)
    ort_out = ort_greedy(step_model, test_sources, model.config.max_target_len)
    mismatches = sum(a != b for a, b in zip(torch_out, ort_out, strict=False))
    if mismatches:
        raise ExportError(f"greedy outputs differ on {mismatches} of {len(test_sources)} test examples")
    parity = {
        "max_abs_log_prob": worst["log_probs"],
        "max_log_prob_difference_over_max_1_abs": worst["log_probs_relative"],
        "max_abs_attention": worst["attention"],
        "max_abs_state": worst["state"],
        "max_abs_memory": worst["memory"],
        "greedy_identical": True,
        "greedy_examples": len(test_sources),
        "shapes": [[b, min(max(1, s), max_source_len)] for b, s in shapes],
        "tolerance": PARITY_TOLERANCE,
        # PyTorch float32 against the model in float64 on the same inputs, and the tolerance that allowed for it.
        "float32_error": {
            "log_prob_difference_over_max_1_abs": worst["float32_log_probs_relative"],
            "attention": worst["float32_attention"],
        },
        "tolerance_used": tolerance,
    }
    return Verification(parity=parity, greedy=ort_out)


def _exact_match(predictions: list[list[int]], target: Tokenizer, references: list[str]) -> float:
    right = sum(target.decode(p) == target.normalize(r) for p, r in zip(predictions, references, strict=False))
    return right / max(len(references), 1)


def quantize_int8(directory: Path) -> None:
    """Dynamic int8 quantization of both graphs' weights (onnxruntime.quantization), in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in ("encoder.onnx", "decoder.onnx"):
        source = directory / name
        quantized = directory / f"{name}.int8"
        quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8)
        quantized.replace(source)


# --------------------------------------------------------------------------------------------------- main
def export_run(
    run_dir: Path,
    repository: Path,
    name: str,
    *,
    version: int | None = None,
    quantize: str | None = None,
    full_log_probs: bool = False,
    build: dict | None = None,
    progress=print,
) -> ExportResult:
    """Write ``repository/name/VERSION/`` from the run's best checkpoint and verify it; returns its directory.

    The version is assembled in a hidden directory and renamed into place only after verification, so a
    server scanning the repository never sees half an export.
    """
    if not is_valid_model_name(name):
        raise ExportError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (at most 64)")
    if quantize not in (None, "int8"):
        raise ExportError(f"unknown quantization {quantize!r}; supported: int8")
    run_dir, repository = Path(run_dir), Path(repository)
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    model, _ = load_checkpoint(run_dir / "best.pt")
    tokenizer_kind = run["tokenizer"]
    source_tok = load_tokenizer(tokenizer_kind, run_dir / "source.tokenizer.json")
    target_tok = load_tokenizer(tokenizer_kind, run_dir / "target.tokenizer.json")
    version = version or next_version(repository, name)
    final = repository / name / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists; choose another --version")
    staging = repository / name / f".staging-{version}-{int(time.time())}"
    staging.mkdir(parents=True)
    try:
        started = time.monotonic()
        encoder_bytes, decoder_bytes, decoder_section = export_graphs(model, full_log_probs=full_log_probs)
        (staging / "encoder.onnx").write_bytes(encoder_bytes)
        (staging / "decoder.onnx").write_bytes(decoder_bytes)
        shutil.copyfile(run_dir / "source.tokenizer.json", staging / "source.tokenizer.json")
        shutil.copyfile(run_dir / "target.tokenizer.json", staging / "target.tokenizer.json")
        c = model.config
        train_config = train_config_from_dict(run["train_config"])
        document = ModelDocument(
            name=name,
            version=version,
            task={"kind": train_config.task.split(":", 1)[0], **run.get("data", {}).get("task", {})},
            architecture={
                **c.to_dict(),
                "source_vocab": source_tok.vocab_size,
                "target_vocab": target_tok.vocab_size,
            },
            tokenizers=Tokenizers(
                source=TokenizerFile(
                    type=tokenizer_kind, file="source.tokenizer.json", normalization=source_tok.normalization
                ),
                target=TokenizerFile(
                    type=tokenizer_kind, file="target.tokenizer.json", normalization=target_tok.normalization
                ),
            ),
            limits=Limits(max_source_tokens=c.max_source_len, max_target_tokens=c.max_target_len, top_k=c.top_k),
            encoder=GraphFile(file="encoder.onnx"),
            decoder=decoder_section,
            special_tokens=SpecialTokens(**SPECIAL_TOKENS),
            onnx={
                "opset": OPSET,
                "exporter": "torchscript (torch.onnx.export dynamo=False)",
                "torch": torch.__version__,
                "op_types": {"encoder": op_types(encoder_bytes), "decoder": op_types(decoder_bytes)},
            },
            metrics=run["metrics"],
            data=run.get("data", {}),
            training={k: v for k, v in run["training"].items() if k != "history"},
            build=build,
        )
        document.write(staging)
        progress(f"exported {name} v{version} graphs in {time.monotonic() - started:.1f}s; verifying parity")
        splits = load_task(train_config.task, train_config.seed, train_config.data_options, train_config.max_pairs)
        test_items = encode_pairs(splits.test, source_tok, target_tok)
        test_sources = [s for s, _ in test_items if len(s) <= c.max_source_len]
        verification = verify(model, staging, test_sources, c.max_source_len)
        document.parity = verification.parity
        progress(f"parity: {document.parity}")
        if quantize == "int8":
            references = [
                p.target for p, (s, _) in zip(splits.test, test_items, strict=False) if len(s) <= c.max_source_len
            ]
            fp32 = _exact_match(verification.greedy, target_tok, references)
            quantize_int8(staging)
            int8 = _exact_match(
                ort_greedy(
                    OnnxStepModel(document, staging, providers=["CPUExecutionProvider"]),
                    test_sources,
                    c.max_target_len,
                ),
                target_tok,
                references,
            )
            document.quantization = {
                "type": "int8 dynamic (weights QInt8)",
                "test_exact_match_fp32": fp32,
                "test_exact_match_int8": int8,
                "change": round(int8 - fp32, 5),
            }
            document.onnx = {
                **(document.onnx or {}),
                "op_types": {
                    "encoder": op_types((staging / "encoder.onnx").read_bytes()),
                    "decoder": op_types((staging / "decoder.onnx").read_bytes()),
                },
            }
            progress(f"int8: test exact match {fp32:.4f} -> {int8:.4f}")
        document.write(staging)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(directory=final, document=document)

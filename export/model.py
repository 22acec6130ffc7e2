"""The attention encoder-decoder, written so that training and the exported ONNX graphs run the same code.

The decoder is driven one step at a time both when training (teacher forcing) and in the exported
``decoder.onnx``: :meth:`Seq2Seq.step` *is* the exported graph. Its state is a dict of named tensors with the
batch on the first axis, which is what lets the server gather and reorder rows without knowing whether the
model is a GRU or an LSTM, Bahdanau- or Luong-style.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from export.attention import ATTENTION_KINDS, Attention
from service.runtime.tokenizers import BOS, EOS, PAD

ENCODER_KINDS = ("gru", "lstm", "transformer")
CELL_KINDS = ("gru", "lstm")
STYLES = ("bahdanau", "luong")


@dataclass
class Architecture:
    """Architecture hyper-parameters; saved in checkpoints and in model.json."""

    source_vocab: int
    target_vocab: int
    attention: str = "additive"
    style: str = "bahdanau"
    encoder: str = "gru"
    decoder: str = "gru"
    embedding: int = 64
    hidden: int = 128
    encoder_layers: int = 1
    decoder_layers: int = 1
    dropout: float = 0.0
    local_window: int | None = None
    max_source_len: int = 64
    max_target_len: int = 32
    top_k: int = 16
    transformer_heads: int = 4

    def __post_init__(self) -> None:
        checks = [
            (self.attention in ATTENTION_KINDS, f"attention {self.attention!r} is not one of {ATTENTION_KINDS}"),
            (self.style in STYLES, f"style {self.style!r} is not one of {STYLES}"),
            (self.encoder in ENCODER_KINDS, f"encoder {self.encoder!r} is not one of {ENCODER_KINDS}"),
            (self.decoder in CELL_KINDS, f"decoder {self.decoder!r} is not one of {CELL_KINDS}"),
            (self.hidden >= 2 and self.hidden % 2 == 0, f"hidden must be an even number >= 2, got {self.hidden}"),
            (self.encoder_layers >= 1, f"encoder_layers must be >= 1, got {self.encoder_layers}"),
            (self.decoder_layers >= 1, f"decoder_layers must be >= 1, got {self.decoder_layers}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (1 <= self.top_k <= self.target_vocab, f"top_k must be in 1..{self.target_vocab}, got {self.top_k}"),
            (
                self.encoder != "transformer" or self.hidden % self.transformer_heads == 0,
                f"hidden {self.hidden} must be divisible by transformer_heads {self.transformer_heads}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return asdict(self)


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ``length`` steps and leave its padding in place.

    The permutation is its own inverse, so the same call maps a backward RNN's outputs back. Doing this
    instead of packing keeps the backward direction exact under padding and exports as plain Gather ops.
    """
    positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    lengths_col = lengths.unsqueeze(1)
    index = torch.where(positions < lengths_col, lengths_col - 1 - positions, positions)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def last_valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x[b, lengths[b] - 1]`` for every row of ``x [B, S, D]``."""
    index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, x.shape[2])
    return torch.gather(x, 1, index).squeeze(1)


class BiRNNEncoder(nn.Module):
    """Stacked bidirectional GRU/LSTM whose outputs at real positions never depend on padding."""

    def __init__(self, cell: str, input_size: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        half = hidden // 2
        self.forward_rnns = nn.ModuleList()
        self.backward_rnns = nn.ModuleList()
        for layer in range(layers):
            size = input_size if layer == 0 else hidden
            self.forward_rnns.append(rnn(size, half, batch_first=True))
            self.backward_rnns.append(rnn(size, half, batch_first=True))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(outputs [B, S, hidden], summary [B, hidden])``, summary = both directions' final states."""
        summary = x.new_zeros(0)
        for index, (fwd, bwd) in enumerate(zip(self.forward_rnns, self.backward_rnns, strict=False)):
            if index > 0:
                x = self.dropout(x)
            out_fwd, _ = fwd(x)
            out_rev, _ = bwd(reverse_within_length(x, lengths))
            out_bwd = reverse_within_length(out_rev, lengths)
            x = torch.cat([out_fwd, out_bwd], dim=-1)
            summary = torch.cat([last_valid(out_fwd, lengths), last_valid(out_rev, lengths)], dim=-1)
        return x, summary


class SelfAttentionLayer(nn.Module):
    """A pre-norm Transformer encoder layer with key-padding masking (written out so it exports plainly)."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        head_dim = hidden // self.heads
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(pad_mask[:, None, None, :], float("-inf"))
        mixed = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(batch, length, hidden)
        x = x + self.dropout(self.out(mixed))
        return x + self.dropout(self.ff(self.norm2(x)))


class TransformerEncoder(nn.Module):
    def __init__(self, input_size: int, hidden: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.project = nn.Linear(input_size, hidden)
        self.layers = nn.ModuleList(SelfAttentionLayer(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.hidden = hidden

    def positional(self, length: int, device: torch.device) -> torch.Tensor:
        """Sinusoidal position encodings ``[length, hidden]`` (Vaswani et al. 2017), computed for any length."""
        position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
        rate = torch.exp(
            torch.arange(0, self.hidden, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / self.hidden)
        )
        angles = position * rate
        return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(length, self.hidden)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad_mask = torch.arange(x.shape[1], device=x.device).unsqueeze(0) >= lengths.unsqueeze(1)
        x = self.project(x) + self.positional(x.shape[1], x.device).unsqueeze(0)
        for layer in self.layers:
            x = layer(x, pad_mask)
        x = self.norm(x)
        keep = (~pad_mask).unsqueeze(-1).to(x.dtype)
        summary = (x * keep).sum(dim=1) / lengths.unsqueeze(1).to(x.dtype)
        return x, summary


@dataclass
class EncodedSource:
    """The encoder's result inside PyTorch: what the ONNX encoder graph returns as named memory and state tensors."""

    memory: torch.Tensor
    keys: torch.Tensor | None
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class Seq2Seq(nn.Module):
    def __init__(self, config: Architecture) -> None:
        super().__init__()
        self.config = c = config
        self.source_embedding = nn.Embedding(c.source_vocab, c.embedding, padding_idx=PAD)
        self.target_embedding = nn.Embedding(c.target_vocab, c.embedding, padding_idx=PAD)
        self.encoder: TransformerEncoder | BiRNNEncoder
        if c.encoder == "transformer":
            self.encoder = TransformerEncoder(c.embedding, c.hidden, c.encoder_layers, c.transformer_heads, c.dropout)
        else:
            self.encoder = BiRNNEncoder(c.encoder, c.embedding, c.hidden, c.encoder_layers, c.dropout)
        self.memory_proj = nn.Linear(c.hidden, c.hidden)
        self.bridge = nn.Linear(c.hidden, c.hidden * c.decoder_layers)
        self.attention = Attention(c.attention, c.hidden, max_source_len=c.max_source_len, local_window=c.local_window)
        cell = nn.GRUCell if c.decoder == "gru" else nn.LSTMCell
        # Bahdanau feeds the context computed from the previous state; Luong feeds the previous attentional
        # vector (input feeding). Either way the first layer's input is [embedding; hidden-sized vector].
        self.cells = nn.ModuleList(
            cell(c.embedding + c.hidden if layer == 0 else c.hidden, c.hidden) for layer in range(c.decoder_layers)
        )
        self.dropout = nn.Dropout(c.dropout)
        if c.style == "bahdanau":
            self.readout = nn.Linear(c.hidden * 2 + c.embedding, c.hidden)
        else:
            self.readout = nn.Linear(c.hidden * 2, c.hidden)
        self.output = nn.Linear(c.hidden, c.target_vocab)

    # ----------------------------------------------------------------------------------------------- names
    @property
    def memory_names(self) -> list[str]:
        return ["memory", "keys"] if self.attention.needs_keys else ["memory"]

    @property
    def state_names(self) -> list[str]:
        names = ["hidden"]
        if self.config.decoder == "lstm":
            names.append("cell")
        if self.config.style == "luong":
            names.append("feed")
        return names

    # ----------------------------------------------------------------------------------------------- encoder
    def encode(self, source_ids: torch.Tensor, source_lengths: torch.Tensor) -> EncodedSource:
        embedded = self.dropout(self.source_embedding(source_ids))
        outputs, summary = self.encoder(embedded, source_lengths)
        keep = (
            (torch.arange(source_ids.shape[1], device=source_ids.device).unsqueeze(0) < source_lengths.unsqueeze(1))
            .unsqueeze(-1)
            .to(outputs.dtype)
        )
        # Zero beyond each row's length: the server pads memory with zeros and relies on it.
        memory = self.memory_proj(outputs) * keep
        keys = self.attention.keys(memory) * keep if self.attention.needs_keys else None
        batch = source_ids.shape[0]
        hidden = torch.tanh(self.bridge(summary)).view(batch, self.config.decoder_layers, self.config.hidden)
        state = {"hidden": hidden}
        if self.config.decoder == "lstm":
            state["cell"] = torch.zeros_like(hidden)
        if self.config.style == "luong":
            state["feed"] = hidden.new_zeros(batch, self.config.hidden)
        return EncodedSource(memory=memory, keys=keys, state=state)

    # ----------------------------------------------------------------------------------------------- one step
    def step(
        self,
        tokens: torch.Tensor,
        source_lengths: torch.Tensor,
        memory: torch.Tensor,
        keys: torch.Tensor | None,
        state: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One decoding step for every row: returns ``(log_probs [B, V], attention [B, S], new state)``."""
        keys = memory if keys is None else keys
        embedded = self.dropout(self.target_embedding(tokens))
        hidden = state["hidden"]
        cell_state = state.get("cell")
        new_state: dict[str, torch.Tensor] = {}
        if self.config.style == "bahdanau":
            context, weights = self.attention(hidden[:, -1], memory, keys, source_lengths)
            top, new_hidden, new_cell = self._run_cells(torch.cat([embedded, context], -1), hidden, cell_state)
            features = torch.tanh(self.readout(torch.cat([top, context, embedded], -1)))
        else:
            top, new_hidden, new_cell = self._run_cells(torch.cat([embedded, state["feed"]], -1), hidden, cell_state)
            context, weights = self.attention(top, memory, keys, source_lengths)
            features = torch.tanh(self.readout(torch.cat([context, top], -1)))
            new_state["feed"] = features
        new_state["hidden"] = new_hidden
        if new_cell is not None:
            new_state["cell"] = new_cell
        log_probs = torch.log_softmax(self.output(self.dropout(features)), dim=-1)
        return log_probs, weights, new_state

    def _run_cells(
        self, x: torch.Tensor, hidden: torch.Tensor, cell_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        hiddens, cells = [], []
        for layer, cell in enumerate(self.cells):
            if layer > 0:
                x = self.dropout(x)
            if cell_state is None:
                h = cell(x, hidden[:, layer])
            else:
                h, c = cell(x, (hidden[:, layer], cell_state[:, layer]))
                cells.append(c)
            hiddens.append(h)
            x = h
        new_cell = torch.stack(cells, dim=1) if cells else None
        return x, torch.stack(hiddens, dim=1), new_cell

    # ----------------------------------------------------------------------------------------------- training
    def forward(self, source_ids: torch.Tensor, source_lengths: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-probabilities ``[B, T, V]`` for ``target_in`` (bos + target, padded)."""
        enc = self.encode(source_ids, source_lengths)
        state = enc.state
        outputs = []
        for t in range(target_in.shape[1]):
            log_probs, _, state = self.step(target_in[:, t], source_lengths, enc.memory, enc.keys, state)
            outputs.append(log_probs)
        return torch.stack(outputs, dim=1)

    @torch.no_grad()
    def greedy(
        self, source_ids: torch.Tensor, source_lengths: torch.Tensor, max_len: int | None = None
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy decoding in eager PyTorch: the reference the exported graphs are checked against.

        Returns each row's tokens (``eos`` excluded) and its attention rows ``[steps, S]`` (the eos step
        included when the row ended with eos).
        """
        max_len = max_len or self.config.max_target_len
        enc = self.encode(source_ids, source_lengths)
        batch = source_ids.shape[0]
        tokens = torch.full((batch,), BOS, dtype=torch.long, device=source_ids.device)
        state = enc.state
        finished = torch.zeros(batch, dtype=torch.bool, device=source_ids.device)
        steps_taken = torch.zeros(batch, dtype=torch.long, device=source_ids.device)
        all_tokens, all_weights = [], []
        for _ in range(max_len):
            log_probs, weights, state = self.step(tokens, source_lengths, enc.memory, enc.keys, state)
            tokens = log_probs.argmax(dim=-1)
            all_tokens.append(tokens)
            all_weights.append(weights)
            steps_taken += (~finished).long()
            finished = finished | (tokens == EOS)
            if bool(finished.all()):
                break
        token_matrix = torch.stack(all_tokens, dim=1).tolist()
        weight_matrix = torch.stack(all_weights, dim=1)
        outputs, attention = [], []
        for row in range(batch):
            taken = int(steps_taken[row])
            outputs.append([t for t in token_matrix[row][:taken] if t != EOS])
            attention.append(weight_matrix[row, :taken])
        return outputs, attention


class EncoderGraph(nn.Module):
    """What ``encoder.onnx`` computes: memory tensors, then the initial decoder state."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, source_ids: torch.Tensor, source_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        enc = self.model.encode(source_ids, source_lengths)
        memory = [enc.memory] + ([enc.keys] if enc.keys is not None else [])
        return (*memory, *(enc.state[name] for name in self.model.state_names))


class DecoderStepGraph(nn.Module):
    """What ``decoder.onnx`` computes: one step, returning only the top-k candidates (and optionally all)."""

    def __init__(self, model: Seq2Seq, *, full_log_probs: bool = False) -> None:
        super().__init__()
        self.model = model
        self.full_log_probs = full_log_probs

    def forward(
        self, tokens: torch.Tensor, source_lengths: torch.Tensor, *tensors: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        n_memory = len(model.memory_names)
        memory = tensors[0]
        keys = tensors[1] if n_memory == 2 else None
        state = dict(zip(model.state_names, tensors[n_memory:], strict=False))
        log_probs, weights, new_state = model.step(tokens, source_lengths, memory, keys, state)
        top_log_probs, top_ids = torch.topk(log_probs, model.config.top_k, dim=-1)
        outputs = (top_log_probs, top_ids, weights, *(new_state[name] for name in model.state_names))
        return outputs + (log_probs,) if self.full_log_probs else outputs

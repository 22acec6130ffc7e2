"""Attention score functions over encoder memory, one module for the whole family.

With ``q`` the decoder query ``[B, H]`` and ``m`` the encoder memory ``[B, S, H]``:

============  ====================================================================
kind          score(q, m_s)
============  ====================================================================
additive      ``v^T tanh(W1 q + W2 m_s)``            (Bahdanau; Luong "concat")
dot           ``q^T m_s``
scaled_dot    ``q^T m_s / sqrt(H)``
general       ``q^T W m_s``                           (Luong multiplicative)
location      ``(W_a q)_s`` for s < max_source_len    (Luong location-based)
cosine        ``beta * cos(q, m_s)``                  (content-based, as in NTM)
============  ====================================================================

The weights are a softmax over the unmasked positions only: padded positions get exactly 0 because their
scores are ``-inf`` before the softmax. Optional local-p attention (Luong et al. 2015) predicts a centre
``p = (len - 1) * sigmoid(v_p^T tanh(W_p q))`` per row, restricts the softmax to ``|s - p| <= D`` and adds the
log of a Gaussian with ``sigma = D / 2`` to the scores, which equals multiplying the weights by the Gaussian
and renormalising, so rows still sum to 1. We scale by ``len - 1`` rather than the paper's ``S`` so the centre
always lies on a real position and the window is never empty.

Everything that depends only on the memory (``W2 m`` for additive, ``W m`` for general, normalised memory for
cosine) is computed once per request by :meth:`Attention.keys`; the decoder step only does per-query work.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ATTENTION_KINDS = ("additive", "dot", "scaled_dot", "general", "location", "cosine")


class Attention(nn.Module):
    def __init__(self, kind: str, hidden: int, *, max_source_len: int, local_window: int | None = None) -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        if local_window is not None and local_window < 1:
            raise ValueError(f"local_window must be >= 1 source positions, got {local_window}")
        self.kind = kind
        self.hidden = hidden
        self.max_source_len = max_source_len
        self.local_window = local_window
        if kind == "additive":
            self.query_proj = nn.Linear(hidden, hidden, bias=False)
            self.key_proj = nn.Linear(hidden, hidden, bias=True)
            self.energy = nn.Linear(hidden, 1, bias=False)
        elif kind == "general":
            self.key_proj = nn.Linear(hidden, hidden, bias=False)
        elif kind == "location":
            self.location = nn.Linear(hidden, max_source_len)
        elif kind == "cosine":
            # Sharpness beta is learnt; softplus keeps it positive as in the NTM addressing.
            self.raw_beta = nn.Parameter(torch.tensor(math.log(math.expm1(5.0))))
        if local_window is not None:
            self.centre_hidden = nn.Linear(hidden, hidden)
            self.centre_out = nn.Linear(hidden, 1, bias=False)

    @property
    def needs_keys(self) -> bool:
        """True when the memory is transformed once per request into separate attention keys."""
        return self.kind in ("additive", "general", "cosine")

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """Per-request precomputation over ``memory [B, S, H]``; returns ``[B, S, H]``."""
        if self.kind in ("additive", "general"):
            return self.key_proj(memory)
        if self.kind == "cosine":
            return memory / memory.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return memory

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(context [B, H], weights [B, S])`` for ``query [B, H]``; ``lengths [B]`` are real lengths."""
        scores = self._scores(query, memory, keys)
        positions = torch.arange(memory.shape[1], device=memory.device).unsqueeze(0)
        lengths_col = lengths.unsqueeze(1)
        masked = positions >= lengths_col
        if self.local_window is not None:
            window = float(self.local_window)
            gate = torch.sigmoid(self.centre_out(torch.tanh(self.centre_hidden(query))))
            centre = (lengths_col - 1).to(scores.dtype) * gate
            distance = positions.to(scores.dtype) - centre
            sigma = window / 2.0
            scores = scores - distance * distance / (2.0 * sigma * sigma)
            masked = masked | (distance.abs() > window)
        scores = scores.masked_fill(masked, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return context, weights

    def _scores(self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.kind == "additive":
            hidden = torch.tanh(self.query_proj(query).unsqueeze(1) + keys)
            return self.energy(hidden).squeeze(-1)
        if self.kind in ("dot", "general"):
            return torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)
        if self.kind == "scaled_dot":
            return torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.hidden)
        if self.kind == "location":
            # One learnt score per source position, cut to this batch's padded length.
            return self.location(query)[:, : memory.shape[1]]
        # cosine: keys are already unit vectors.
        unit_query = query / query.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        beta = nn.functional.softplus(self.raw_beta)
        return beta * torch.bmm(keys, unit_query.unsqueeze(-1)).squeeze(-1)

"""What a decoder step model returns: the records shared by the runtime (producer) and the engine (consumer).

They live in the runtime layer so that dependencies point one way: the engine imports them, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EncoderOutput:
    """What `StepModel.encode` returns for a batch of B sources padded to S tokens.

    `memory`: one float32 array [B, S, ...] per `StepModel.memory_names` (fixed while decoding).
    `state`: one float32 array [B, ...] per `StepModel.state_names` (the decoder's initial state).
    """

    memory: dict[str, np.ndarray]
    state: dict[str, np.ndarray]


@dataclass(frozen=True)
class StepOutput:
    """What `StepModel.step` returns for N decoder rows.

    `topk_log_probs` float32 [N, K], descending; `topk_ids` int64 [N, K]; `attention` float32 [N, S]
    (0 beyond each row's source length); `state`: one array [N, ...] per `StepModel.state_names`.
    """

    topk_log_probs: np.ndarray
    topk_ids: np.ndarray
    attention: np.ndarray
    state: dict[str, np.ndarray]

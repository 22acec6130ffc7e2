"""The onnxruntime execution providers a server can be asked for; a leaf module, so that the settings and the
client can name them without loading the runtime."""

from __future__ import annotations

from typing import Literal, get_args

Provider = Literal["auto", "cpu", "cuda"]
"""What `--provider` may say: `auto` (CUDA when a GPU is usable, else CPU), `cpu` or `cuda`."""

PROVIDERS: tuple[str, ...] = get_args(Provider)

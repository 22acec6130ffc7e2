"""The providers a session is created with, and the options this runtime sets on them."""

from __future__ import annotations

from service.runtime.model import with_provider_options
from service.settings import Settings


def test_cuda_runs_in_float32_unless_tf32_is_asked_for() -> None:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert with_provider_options(providers) == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert with_provider_options(providers, tf32=True) == [
        ("CUDAExecutionProvider", {"use_tf32": "1"}),
        "CPUExecutionProvider",
    ]


def test_the_cpu_provider_takes_no_options() -> None:
    assert with_provider_options(["CPUExecutionProvider"], tf32=True) == ["CPUExecutionProvider"]


def test_tf32_is_off_unless_a_flag_or_a_variable_turns_it_on() -> None:
    assert Settings.from_sources([], {}).cuda_tf32 is False
    assert Settings.from_sources(["--cuda-tf32", "true"], {}).cuda_tf32 is True
    assert Settings.from_sources([], {"ATTNSERVE_CUDA_TF32": "true"}).cuda_tf32 is True

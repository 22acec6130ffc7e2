"""The providers a session is created with, and the options this runtime sets on them."""

from __future__ import annotations

from pathlib import Path

from service.runtime.model import _create_session, with_provider_options
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


class RecordingRuntime:
    """Stands in for the onnxruntime module at the calls `_create_session` makes, and records them."""

    def __init__(self) -> None:
        self.sessions: list[list] = []
        self.severities: list[int] = []

    def InferenceSession(self, path: str, options: object, providers: list) -> str:  # noqa: N802 (onnxruntime's name)
        self.sessions.append(providers)
        return path

    def set_default_logger_severity(self, level: int) -> None:
        self.severities.append(level)


def test_a_cuda_session_is_asked_for_with_the_options_and_quietly() -> None:
    runtime = RecordingRuntime()
    _create_session(runtime, Path("decoder.onnx"), None, ["CUDAExecutionProvider", "CPUExecutionProvider"], True)
    assert runtime.sessions == [[("CUDAExecutionProvider", {"use_tf32": "1"}), "CPUExecutionProvider"]]
    assert runtime.severities == [4, 3]  # quiet while the CUDA provider may fail, then back to errors only
    _create_session(runtime, Path("decoder.onnx"), None, ["CPUExecutionProvider"], True)
    assert runtime.sessions[-1] == ["CPUExecutionProvider"] and runtime.severities == [4, 3]

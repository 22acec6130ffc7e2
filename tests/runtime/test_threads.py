"""onnxruntime's threads for a model version: chosen from the provider, the decoder's size and the CPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.runtime.model import LARGE_DECODER_BYTES, RuntimeThreads, choose_threads, load_model

REPOSITORY = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize(
    ("on_gpu", "decoder_bytes", "cpus", "expected", "overlap"),
    [
        (True, 10 * LARGE_DECODER_BYTES, 16, 1, False),  # the device does the work, both calls on one device
        (False, LARGE_DECODER_BYTES - 1, 16, 1, False),  # small operators: a second thread costs more than it saves
        (False, LARGE_DECODER_BYTES, 16, 4, True),  # half the CPUs, at most 4; the encoder beside on the rest
        (False, LARGE_DECODER_BYTES, 6, 3, True),
        (False, LARGE_DECODER_BYTES, 3, 1, True),
        (False, LARGE_DECODER_BYTES, 1, 1, False),  # never 0, which would be onnxruntime's spinning pool
    ],
)
def test_threads_chosen_for_the_model(
    on_gpu: bool, decoder_bytes: int, cpus: int, expected: int, overlap: bool
) -> None:
    threads = choose_threads(0, 1, False, on_gpu=on_gpu, decoder_bytes=decoder_bytes, cpus=cpus)
    assert threads == RuntimeThreads(
        intra_op=expected, inter_op=1, spinning=False, chosen=True, encoder_overlap=overlap
    )


@pytest.mark.parametrize(
    ("intra_op", "cpus", "setting", "overlap"),
    [
        (2, 4, "auto", True),  # both sessions' threads fit the CPUs
        (3, 4, "auto", False),  # they do not: the encoder stays in the stepping thread
        (3, 4, "on", True),
        (1, 16, "off", False),
    ],
)
def test_the_encoder_overlap_of_a_large_model_follows_the_setting_and_the_cpus(
    intra_op: int, cpus: int, setting: str, overlap: bool
) -> None:
    threads = choose_threads(
        intra_op, 1, False, on_gpu=False, decoder_bytes=LARGE_DECODER_BYTES, cpus=cpus, encoder_overlap=setting
    )
    assert threads.intra_op == intra_op and threads.encoder_overlap is overlap


def test_threads_as_set_are_kept() -> None:
    threads = choose_threads(3, 2, True, on_gpu=True, decoder_bytes=1, cpus=1)
    assert threads == RuntimeThreads(intra_op=3, inter_op=2, spinning=True, chosen=False)
    assert threads.describe() == "3 intra-op threads (as set), spinning on"


def test_a_loaded_model_runs_with_the_chosen_threads() -> None:
    # The shipped dates model has a small decoder: one thread, no spinning, on the sessions themselves.
    loaded = load_model(REPOSITORY / "dates" / "1", provider="cpu", cpus=8)
    assert loaded.threads == RuntimeThreads(intra_op=1, inter_op=1, spinning=False, chosen=True, encoder_overlap=False)
    for session in (loaded.step_model._encoder, loaded.step_model._decoder):
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"

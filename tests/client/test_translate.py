"""`attnserve translate` (server and offline modes), the alignment plot, and unknown-token replacement."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from client import translate as client
from client.plot import plot_alignment
from service.dataplane import Dataplane
from service.runtime.tokenizers import EOS, UNK, CharTokenizer, WordTokenizer
from service.settings import Settings
from tests.service.server_harness import ServerThread, make_settings

pytestmark = pytest.mark.slow  # trains models or starts servers

TEXT = "samedi 21 novembre 2026"


@pytest.fixture(scope="module")
def server_settings(tiny_repository: Path) -> Settings:
    return make_settings(tiny_repository, metrics_port=0)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = client.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.slow
def test_server_and_offline_modes_agree(
    server: ServerThread, tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, online, _ = run(capsys, "--server", server.address, "--beam", "3", "--n-best", "2", TEXT)
    assert status == 0
    status, offline, _ = run(capsys, "--offline", str(tiny_repository / "dates"), "--beam", "3", "--n-best", "2", TEXT)
    assert status == 0
    assert online == offline
    lines = online.splitlines()
    assert lines[0] == TEXT and lines[1].startswith("  1. ") and lines[2].startswith("  2. ") and "(score -" in lines[1]


@pytest.mark.slow
def test_offline_normalises_as_the_server_does(
    server: ServerThread, tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # CLDR's narrow no-break space and right-to-left mark, capitals and full-width digits: the model's declared
    # normalisation makes this TEXT, offline as on the server.
    written = "SAMEDI\u202f21 NOVEMBRE \uff12\uff10\uff12\uff16\u200f"
    answers = [
        json.loads(run(capsys, *where, "--json", text)[1])
        for where in (("--offline", str(tiny_repository / "dates")), ("--server", server.address))
        for text in (TEXT, written)
    ]
    assert answers[0]["translations"][0]["hypotheses"][0]["text"]
    assert answers[1:] == [answers[0]] * 3


@pytest.mark.slow
def test_json_and_plot(server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "alignment.png"
    status, out, err = run(capsys, "--server", server.address, "--json", "--plot", str(image), TEXT)
    assert status == 0
    response = json.loads(out)
    assert response["model"] == "dates"
    best = response["translations"][0]["hypotheses"][0]
    assert len(best["attention"]) == len(best["source_tokens"]) * len(best["target_tokens"])
    assert image.stat().st_size > 1000 and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(image) in err


@pytest.mark.slow
def test_stream_prints_the_same_translation(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    _, unary, _ = run(capsys, "--server", server.address, TEXT)
    status, streamed, _ = run(capsys, "--server", server.address, "--stream", TEXT)
    assert status == 0
    assert streamed == unary  # "<translation>\t(score ...)" either way


@pytest.mark.slow
def test_failures_print_the_status_and_exit_one(
    server: ServerThread, tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "--server", server.address, "--model", "nope", TEXT)
    assert (status, out) == (1, "")
    assert err.startswith("attnserve translate: NOT_FOUND: ")
    status, _, err = run(capsys, "--offline", str(tiny_repository), "--beam", "99", TEXT)
    assert status == 1 and "INVALID_ARGUMENT: beam_size 99" in err


def test_plot_alignment_writes_an_image_without_glyph_warnings(tmp_path: Path) -> None:
    source = ["東", "京", "▁Tokyo", " ", "</s>"]
    target = ["T", "ō", "</s>"]
    matrix = np.full((3, 5), 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing CJK glyph must not warn (nor crash)
        written = plot_alignment(source, target, matrix, tmp_path / "sub" / "cjk.png", title="東京 -> Tōkyō")
    assert written.is_file() and written.stat().st_size > 1000


def test_plot_alignment_checks_the_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        plot_alignment(["a", "b", "</s>"], ["x", "</s>"], np.zeros((3, 2)), tmp_path / "bad.png")


def _char_tokenizer(characters: str) -> CharTokenizer:
    return CharTokenizer(["<pad>", "<s>", "</s>", "<unk>", *characters])


def test_replace_unknowns_uses_the_most_attended_source_piece() -> None:
    target = _char_tokenizer("ab-")
    a, b, dash = 4, 5, 6
    source_tokens = ("x", "Z", "y", "</s>")
    # UNK at position 1 attends to source position 1 ('Z'); UNK at 3 attends to '</s>' and stays unknown.
    pieces, text = Dataplane._render(target, [a, UNK, b, UNK, dash, EOS], [0, 1, 2, 3, 0, 0], source_tokens, True)
    assert pieces == ["a", "Z", "b", "<unk>", "-", "</s>"]
    assert text == "aZb<unk>-"
    untouched_pieces, untouched = Dataplane._render(target, [a, UNK, b, EOS], [0, 1, 2, 0], source_tokens, False)
    assert untouched_pieces == ["a", "<unk>", "b", "</s>"] and untouched == "a<unk>b"


def test_replace_unknowns_with_word_pieces() -> None:
    target = WordTokenizer(["<pad>", "<s>", "</s>", "<unk>", "the", "city", "of"])
    source_tokens = ("la", "ville", "de", "Lyon", "</s>")
    pieces, text = Dataplane._render(target, [4, 5, 6, UNK, EOS], [0, 1, 2, 3, 4], source_tokens, True)
    assert pieces == ["the", "city", "of", "Lyon", "</s>"]
    assert text == "the city of Lyon"


def test_serving_modules_never_import_torch() -> None:
    import subprocess
    import sys

    modules = (
        "service.server, client.translate, service.grpc_api.server, service.dataplane, service.models, "
        "service.metrics, client.plot, service.processes.supervisor, service.processes.__main__, "
        "service.engine_client.socket_client, service.ipc.engine_server"
    )
    probe = f"import sys; import {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"

"""`python -m loadtests.reliability.misbehaving` as a user runs it: a short run of the phases asked for, against the
RPC ceiling (a bare grpc.aio server with gRPC core's limits as attnserve sets them), and the table it prints."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import pytest

from loadtests.reliability import misbehaving
from loadtests.reliability import raw_http2 as h2
from loadtests.servers import noop_server
from service.settings import Settings

pytestmark = pytest.mark.slow  # starts a server and a client process per phase

SETTINGS_MAX_CONCURRENT_STREAMS = 0x3


def advertised_stream_limit(address: str) -> int | None:
    """The MAX_CONCURRENT_STREAMS of the server's first SETTINGS frame (None when it sets none)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0))
        buffer = bytearray()
        while True:
            for kind, flags, _, payload in h2.read_frames(sock, buffer):
                if kind == h2.SETTINGS and not flags & h2.ACK:
                    values = dict(struct.iter_unpack(">HI", payload))
                    return values.get(SETTINGS_MAX_CONCURRENT_STREAMS)


@pytest.mark.parametrize("flags", [(), ("--max-concurrent-streams", "7")], ids=["default", "7"])
def test_the_noop_server_limits_streams_as_attnserve_does(tmp_path: Path, flags: tuple[str, ...]) -> None:
    expected = int(flags[1]) if flags else Settings().max_concurrent_streams
    with noop_server(tmp_path, extra=flags) as server:
        assert advertised_stream_limit(server.address) == expected


def test_a_run_of_the_phases_asked_for_against_the_bare_grpc_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = misbehaving.main(["--server", "noop", "--phases", "metadata", "--seconds", "1", "--work", str(tmp_path)])
    printed = capsys.readouterr().out
    assert (tmp_path / "rpc-ceiling.log").is_file()  # the noop server's log: it, not attnserve, was started
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].removeprefix("| ") for row in rows[1:]] == ["baseline", "oversized metadata", "after"]
    (metadata,) = [row for row in rows if row[0] == "| oversized metadata"]
    # gRPC core refuses 64 KiB of metadata (its limit is 16 KiB), every such call; the well-behaved calls are answered.
    assert re.fullmatch(r"calls with 64 KiB of metadata: RESOURCE_EXHAUSTED [\d,]+", metadata[1])
    assert all(re.fullmatch(r"OK [\d,]+", row[2]) for row in rows[1:])
    assert status == 0


def test_an_unknown_phase_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        misbehaving.main(["--server", "noop", "--phases", "resets,floods", "--work", str(tmp_path)])
    assert exited.value.code == 2
    assert "unknown phases ['floods']" in capsys.readouterr().err

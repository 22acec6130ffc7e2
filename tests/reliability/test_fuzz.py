"""The fuzz campaign (loadtests/reliability/fuzz.py): its inputs are made again exactly from a seed and an index,
the descriptor walk reaches every field of every request message, and a short campaign against a real server (the
tiny trained models, its own process) finds nothing: every call answered before its deadline with an accepted
status, the answers fit the requests, the server alive and counting exactly the calls the client saw.
`make fuzz` runs the long campaign.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.message import Message

from loadtests.reliability.fuzz import (
    GRPC_METHODS,
    Campaign,
    grpc_input,
    http_input,
    run_campaign,
    start_fuzz_server,
)
from loadtests.reliability.fuzz_inputs import ProtoFuzzer, mutate_bytes
from loadtests.servers import ServerProcess

SEED = 23


def test_an_input_is_the_same_for_the_same_seed_and_index() -> None:
    for index in (0, 1, 57, 4096):
        assert grpc_input(SEED, index) == grpc_input(SEED, index)
        assert http_input(SEED, index) == http_input(SEED, index)
    assert [grpc_input(SEED, index) for index in range(20)] != [grpc_input(SEED + 1, index) for index in range(20)]


def _field_paths(descriptor, prefix: str = "", depth: int = 0) -> set[str]:  # type: ignore[no-untyped-def]
    """Every field path of a message type (map values and nested messages included, down to the fuzzer's depth)."""
    paths = set()
    for field in descriptor.fields:
        path = f"{prefix}{field.name}"
        paths.add(path)
        nested = field.message_type
        if nested is not None and depth < 3:
            if nested.GetOptions().map_entry:
                value = nested.fields_by_name["value"]
                if value.message_type is not None:
                    paths |= _field_paths(value.message_type, f"{path}.", depth + 1)
            else:
                paths |= _field_paths(nested, f"{path}.", depth + 1)
    return paths


def _set_paths(message: Message, prefix: str = "") -> Iterator[str]:
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        yield path
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            for item in value.values():
                if isinstance(item, Message):
                    yield from _set_paths(item, f"{path}.")
        elif field.is_repeated:
            for item in value:
                yield from _set_paths(item, f"{path}.")
        else:
            yield from _set_paths(value, f"{path}.")


@pytest.mark.parametrize("method", GRPC_METHODS, ids=lambda method: method.name)
def test_the_descriptor_walk_sets_every_field_of_every_request(method) -> None:  # type: ignore[no-untyped-def]
    fuzzer = ProtoFuzzer(random.Random(SEED))
    reached: set[str] = set()
    for _ in range(600):
        reached.update(_set_paths(fuzzer.fill(method.request())))
    assert _field_paths(method.request.DESCRIPTOR) - reached == set()


def test_byte_mutation_changes_the_bytes_and_is_reproducible() -> None:
    data = bytes(range(40))
    mutated = [mutate_bytes(random.Random(f"{SEED}/{index}"), data) for index in range(200)]
    assert sum(item != data for item in mutated) >= 190  # a duplicated empty range can leave them as they were
    assert mutated == [mutate_bytes(random.Random(f"{SEED}/{index}"), data) for index in range(200)]


@pytest.fixture(scope="module")
def fuzz_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_fuzz_server(tiny_repository, tmp_path_factory.mktemp("fuzz"))
    yield server
    server.stop()


@pytest.mark.slow
def test_a_short_campaign_over_grpc_and_http_finds_nothing(fuzz_server: ServerProcess) -> None:
    process = fuzz_server.process
    assert process is not None
    campaign = Campaign(
        seed=SEED,
        grpc_inputs=1500,
        http_inputs=800,
        seconds=0.0,
        concurrency=4,
        call_timeout_s=60.0,
        alive=lambda: process.poll() is None,
    )
    result = run_campaign(fuzz_server, campaign)
    assert result.problems == []
    assert (campaign.grpc.inputs, campaign.http.inputs) == (1500, 800)
    # The campaign reaches past the first checks: inputs are translated, and refused for many reasons.
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(campaign.grpc.statuses)
    assert {"200", "400", "404", "415"} <= set(campaign.http.statuses)
    assert set(campaign.grpc.by_kind) == {"generate", "mutate", "bytes"}

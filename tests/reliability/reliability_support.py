"""Helpers of the reliability tests: repositories to reload, models that fail for real, certificates,
metrics scraping and concurrent calls. Nothing here fakes attnserve itself: servers are the real one
(tests/service/server_harness.py), models are real exports, certificates are real X.509."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

# Metric helpers live with the shared server harness; re-exported for the reliability tests.
from tests.service.server_harness import has_sample, metric, metric_sum, scrape, wait_for  # noqa: F401

# ----- repositories -------------------------------------------------------------------------------------


def copy_version(
    source: Path, repository: Path, name: str, version: int, prepare: Callable[[Path], None] | None = None
) -> Path:
    """Copy a version folder into `repository/name/version` the way an export publishes one: into a
    hidden folder first, then renamed into place, so a scanning server never sees it half-written.
    model.json gets the new name and version; `prepare(staging_folder)` may alter (or damage) the copy
    before it is published."""
    target = repository / name / str(version)
    staging = repository / name / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    config_path = staging / "model.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["name"], config["version"] = name, version
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    if prepare is not None:
        prepare(staging)
    os.replace(staging, target)
    return target


def make_decoder_fail_for_long_sources(version_dir: Path, min_source_tokens: int) -> None:
    """Rewrite the version's decoder.onnx so that a decoder step raises at run time whenever a row's
    source has `min_source_tokens` tokens or more (</s> included), and computes exactly what it did
    before otherwise.

    The step's `attention` output gets 0 added, gathered from a table of `min_source_tokens` zeros at
    index source_lengths: onnxruntime's Gather refuses an index past the table, so the step fails for
    real inside onnxruntime, the way a broken kernel or a bad shape would. Warm-up (sources of 4 and 16
    tokens) still passes when min_source_tokens > 16.
    """
    import onnx
    from onnx import helper, numpy_helper

    path = version_dir / "decoder.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name == "attention":
                node.output[index] = "attention_before_trap"
        for index, name in enumerate(node.input):
            if name == "attention":
                node.input[index] = "attention_before_trap"
    graph.initializer.append(numpy_helper.from_array(np.zeros(min_source_tokens, dtype=np.float32), "trap_table"))
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "trap_axis"))
    graph.node.extend(
        [
            helper.make_node("Gather", ["trap_table", "source_lengths"], ["trap_zeros"], axis=0),
            helper.make_node("Unsqueeze", ["trap_zeros", "trap_axis"], ["trap_column"]),
            helper.make_node("Add", ["attention_before_trap", "trap_column"], ["attention"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# ----- metrics ------------------------------------------------------------------------------------------


# ----- calls --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallOutcome:
    """How one call ended: `code` 'OK' or a status name; `started`/`ended` are time.monotonic() seconds."""

    code: str
    details: str
    started: float
    ended: float
    version: str = ""
    texts: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def outcome_of(call: Callable[[], object], texts: Iterable[str] = ()) -> CallOutcome:
    started = time.monotonic()
    try:
        response = call()
    except grpc.RpcError as error:
        return CallOutcome(error.code().name, error.details() or "", started, time.monotonic(), texts=tuple(texts))
    return CallOutcome("OK", "", started, time.monotonic(), getattr(response, "version", ""), tuple(texts))


@dataclass
class Traffic:
    """Threads that call `call(index)` in a loop until stopped, recording every outcome."""

    call: Callable[[int], CallOutcome]
    threads: int = 3
    outcomes: list[CallOutcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, args=(index,), daemon=True) for index in range(self.threads)
        ]

    def _work(self, index: int) -> None:
        count = 0
        while not self._stop.is_set():
            result = self.call(index * 1_000_000 + count)
            count += 1
            with self._lock:
                self.outcomes.append(result)

    def start(self) -> Traffic:
        for worker in self._workers:
            worker.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> list[CallOutcome]:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout_s)
        assert not any(worker.is_alive() for worker in self._workers), "a traffic thread did not stop"
        return self.snapshot()

    def snapshot(self) -> list[CallOutcome]:
        with self._lock:
            return list(self.outcomes)

    def count(self, predicate: Callable[[CallOutcome], bool]) -> int:
        with self._lock:
            return sum(1 for outcome in self.outcomes if predicate(outcome))


# ----- processes ----------------------------------------------------------------------------------------


# ----- certificates -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, written as PEM files."""

    cert_file: Path
    key_file: Path


class CertificateAuthority:
    """A throw-away CA that signs server and client certificates for one test (RSA 2048, SHA-256)."""

    def __init__(self, folder: Path, name: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.folder = folder
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = folder / f"{name}-ca.pem"
        self.cert_file.write_bytes(self._cert.public_bytes(_encoding()))

    def issue(
        self,
        common_name: str,
        *,
        client: bool = False,
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
    ) -> Issued:
        """A leaf certificate for a server (subject alternative names `dns`, `ips`) or a client."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
        )
        if not client:
            names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = self.folder / f"{self.name}-{common_name}"
        cert_file, key_file = stem.with_suffix(".crt.pem"), stem.with_suffix(".key.pem")
        cert_file.write_bytes(cert.public_bytes(_encoding()))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return Issued(cert_file, key_file)


def _encoding():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM

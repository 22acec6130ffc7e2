"""Client-side load balancing and retries for gRPC clients of attnserve replicas.

A Kubernetes ClusterIP Service balances TCP connections, and a gRPC client keeps one long-lived HTTP/2
connection, so every call of that client lands on the same pod. Instead, resolve every replica (a headless
Service: `dns:///attnserve.<namespace>.svc.cluster.local:50051`, or a static `ipv4:host:port,host:port` list)
and let the channel spread calls with the `round_robin` policy. A replica that drains (SIGTERM: health
NOT_SERVING, new calls UNAVAILABLE) is left by the balancer, and calls it refused are retried on another
replica by the retry policy below, so a rollout or a scale-in loses no call.

    channel = grpc.insecure_channel("dns:///attnserve.attnserve.svc.cluster.local:50051",
                                    options=balanced_channel_options())

Any gRPC client can use the same service config (it is plain JSON, see `service_config`).
"""

from __future__ import annotations

import json
from typing import Any

RETRYABLE_STATUS_CODES = ("UNAVAILABLE",)
"""UNAVAILABLE is what a draining or unreachable replica answers; the call did no work there, so retrying
it on another replica is safe. Other codes are the call's own outcome and are never retried."""


def service_config(
    *,
    max_attempts: int = 5,
    initial_backoff_s: float = 0.05,
    max_backoff_s: float = 1.0,
    backoff_multiplier: float = 2.0,
    retryable_status_codes: tuple[str, ...] = RETRYABLE_STATUS_CODES,
) -> dict[str, Any]:
    """The gRPC service config: round_robin over every resolved address, and a retry policy for every
    method of the server. `max_attempts` counts the first try (gRPC caps it at 5); backoffs in seconds."""
    if not 2 <= max_attempts <= 5:
        raise ValueError(f"max_attempts={max_attempts}: must be 2..5 (gRPC's limit)")
    if initial_backoff_s <= 0 or max_backoff_s < initial_backoff_s or backoff_multiplier < 1:
        raise ValueError(
            f"initial_backoff_s={initial_backoff_s}, max_backoff_s={max_backoff_s}, "
            f"backoff_multiplier={backoff_multiplier}: need 0 < initial <= max and multiplier >= 1"
        )
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        # Client-side health checking: a replica that reports NOT_SERVING (it is draining) leaves the
        # rotation before it closes its connections.
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                # An empty name entry matches every service and method of the server.
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": f"{initial_backoff_s:g}s",
                    "maxBackoff": f"{max_backoff_s:g}s",
                    "backoffMultiplier": backoff_multiplier,
                    "retryableStatusCodes": list(retryable_status_codes),
                },
            }
        ],
    }


def balanced_channel_options(**config: Any) -> list[tuple[str, Any]]:
    """Channel options for grpc.insecure_channel / grpc.secure_channel (sync or aio) that apply
    `service_config(**config)` and enable retries."""
    return [
        ("grpc.service_config", json.dumps(service_config(**config))),
        ("grpc.enable_retries", 1),
    ]

"""The peers in the suite: PyTorch (eager, CPU and CUDA) and JAX, where installed.

Their cases live in :mod:`fastgrad.benchmarks.peers`, beside the workloads
(so that ``fastgrad bench --peers`` times the same code) and apart from the
library: nothing that ``import fastgrad`` loads imports torch or jax. Neither
is a dependency of fastgrad; a benchmark of a peer that is not installed (or
has no CUDA device) is skipped with the reason.
"""

from __future__ import annotations

import pytest

from fastgrad.benchmarks.peers import PEERS, available_peers, peer_unavailable_reason

__all__ = ["PEERS", "available_peers", "peer_params", "peer_unavailable_reason", "require_peer"]


def peer_params() -> list[str]:
    """Every peer name, runnable here or not (the suite skips the missing ones)."""
    return list(PEERS)


def require_peer(peer: str) -> None:
    """Skip the calling benchmark, with the reason, when ``peer`` cannot run here."""
    reason = peer_unavailable_reason(peer)
    if reason is not None:
        pytest.skip(f"{peer}: {reason}")

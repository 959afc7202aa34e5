"""PyTorch (eager, CPU and CUDA) and JAX versions of the training loops and gradients.

Same network (the chapter's, or a deeper MultiLayerNet), initial weights,
mini-batches and exact cross-entropy as the fastgrad workloads; PyTorch runs
autograd plus a manual SGD update per step, JAX one jitted ``lax.scan`` over
all steps. Neither package is a dependency of
fastgrad: a peer that is not installed (or has no CUDA device) is skipped
with the reason :func:`peer_unavailable_reason` gives. The builders live in
:mod:`fastgrad._bench_workloads` so that ``fastgrad bench --peers`` times the
same code; this module names them for the suite.
"""

from __future__ import annotations

import pytest

from fastgrad._bench_workloads import PEERS, available_peers, peer_unavailable_reason

__all__ = ["PEERS", "available_peers", "peer_params", "peer_unavailable_reason", "require_peer"]


def peer_params() -> list[str]:
    """Every peer name, runnable here or not (the suite skips the missing ones)."""
    return list(PEERS)


def require_peer(peer: str) -> None:
    """Skip the calling benchmark, with the reason, when ``peer`` cannot run here."""
    reason = peer_unavailable_reason(peer)
    if reason is not None:
        pytest.skip(f"{peer}: {reason}")


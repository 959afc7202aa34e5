"""The NumPy reference backend: the interface's own kernels, no overrides.

Every other backend is tested against this one, so it stays plain.
"""

from __future__ import annotations

import numpy as np

from fastgrad.backends._base import Backend


class NumpyBackend(Backend):
    """Runs every kernel with NumPy on the CPU.

    Examples
    --------
    >>> from fastgrad.backends.numpy_ import NumpyBackend
    >>> NumpyBackend().softmax(np.array([0.0, 0.0])).tolist()
    [0.5, 0.5]
    """

    name = "numpy"
    extra = None
    array_family = "numpy"

    def __init__(self) -> None:
        super().__init__(np)

    def describe(self) -> dict[str, str]:
        facts = super().describe()
        facts.update(_blas_facts())
        return facts


def _blas_facts() -> dict[str, str]:
    """The BLAS NumPy calls and its thread count, when threadpoolctl can tell."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"blas": "unknown (pip install threadpoolctl to see it)"}
    pools = [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]
    if not pools:
        return {"blas": "none found"}
    pool = pools[0]
    threads = pool.get("num_threads")
    return {"blas": f"{pool.get('internal_api')} {pool.get('version')}, {threads} threads"}

"""With ``client=``, the caller's ``x`` is never handed to ``f``: not even for the one local call.

``numerical_gradient(..., client=...)`` calls ``f`` once here (the forward
differences' base value, and the time of one call that sizes the tasks),
then on the workers' copies. A batched ``f`` may write to its own argument,
so that local call must get a copy of ``x``, not a view of it.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastgrad
from tests.conftest import import_extra_or_skip

pytestmark = pytest.mark.dask


@pytest.fixture(scope="module")
def client():
    distributed = import_extra_or_skip("dask", "distributed")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


def scribbling(stack):
    values = (stack**2).sum(axis=1)
    stack[...] = -5.0  # its own argument, which the contract allows
    return values


@pytest.mark.parametrize("method", ["forward", "central"])
def test_a_batched_f_writing_its_argument_leaves_the_callers_x_intact(client, method):
    x = np.array([1.0, 2.0, 3.0])
    grad = fastgrad.numerical_gradient(
        scribbling, x, method=method, batched=True, client=client, backend="numpy"
    )
    np.testing.assert_array_equal(x, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(grad, [2.0, 4.0, 6.0], rtol=1e-3)

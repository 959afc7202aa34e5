"""The benchmarks: what ``fastgrad bench`` and the pytest-benchmark suite in ``bench/`` time.

:mod:`~fastgrad.benchmarks.workloads` builds the timed cases,
:mod:`~fastgrad.benchmarks.peers` their PyTorch and JAX versions, and
:mod:`~fastgrad.benchmarks.runner` is ``fastgrad bench``. Nothing in the
library imports this package, and this package imports the peers only when
one is asked for, so neither torch nor jax is ever on the kernels' import path.
"""

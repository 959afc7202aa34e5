"""Developer sessions: ``nox -s tests lint typecheck bench coverage_nojit gpu``.

Every session passes ``*session.posargs`` through, e.g. ``nox -s tests -- -k numba``.
"""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
if shutil.which("nvidia-smi"):
    # Only machines with an NVIDIA driver run the GPU suite by default.
    nox.options.sessions.append("gpu")

PYTHON = ["3.10", "3.11", "3.12", "3.13"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, Numba backend required (the README's test command)."""
    session.install("-e", ".[numba,plot,test]")
    session.run("pytest", *session.posargs, env={"FASTGRAD_REQUIRE_BACKENDS": "numba"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "fastgrad", "tests", "bench", "noxfile.py", *session.posargs)
    session.run(
        "ruff", "format", "--check", "--diff", "fastgrad", *session.posargs, success_codes=[0, 1]
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[numba,plot]", "mypy")
    session.run("mypy", "fastgrad", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The pytest-benchmark suite for real, saved as JSON under .benchmarks/."""
    session.install("-e", ".[numba,plot,test]")
    session.run(
        "pytest",
        "bench",
        "--benchmark-enable",
        "--benchmark-autosave",
        "--benchmark-columns=median,min,max,rounds",
        "--benchmark-sort=name",
        *session.posargs,
    )


@nox.session
def coverage_nojit(session: nox.Session) -> None:
    """Coverage with NUMBA_DISABLE_JIT=1, so the bodies of the @njit kernels are measured."""
    session.install("-e", ".[numba,test]", "coverage")
    env = {"NUMBA_DISABLE_JIT": "1", "FASTGRAD_REQUIRE_BACKENDS": "numba"}
    session.run(
        "coverage",
        "run",
        "--source=fastgrad",
        "-m",
        "pytest",
        "tests",
        "-q",
        *session.posargs,
        env=env,
    )
    session.run("coverage", "report", "--show-missing", "--fail-under=80")


@nox.session
def gpu(session: nox.Session) -> None:
    """The whole suite with the CuPy backend required (CUDA 12 wheels)."""
    session.install("-e", ".[numba,cuda12x,plot,test]")
    session.run("pytest", *session.posargs, env={"FASTGRAD_REQUIRE_BACKENDS": "numba,cupy"})

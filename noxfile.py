"""Developer sessions: ``nox -s tests lint typecheck bench coverage_nojit gpu wheel``.

Every session passes ``*session.posargs`` through, e.g. ``nox -s tests -- -k numba``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
if shutil.which("nvidia-smi"):
    # Only machines with an NVIDIA driver run the GPU suite by default.
    nox.options.sessions.append("gpu")

PYTHON = ["3.10", "3.11", "3.12", "3.13"]


# The Dask tests fail rather than skip wherever the sessions install the extra.
REQUIRED = {"FASTGRAD_REQUIRE_BACKENDS": "numba", "FASTGRAD_REQUIRE_EXTRAS": "dask"}


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, Numba backend and Dask required (the README's test command)."""
    session.install("-e", ".[numba,plot,test,dask]")
    session.run("pytest", *session.posargs, env=REQUIRED)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run(
        "ruff", "check", "fastgrad", "tests", "bench", "docs", "noxfile.py", *session.posargs
    )
    session.run(
        "ruff", "format", "--check", "--diff", "fastgrad", *session.posargs, success_codes=[0, 1]
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[numba,plot,dask]", "mypy")
    session.run("mypy", "fastgrad", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The pytest-benchmark suite for real, saved as JSON under .benchmarks/."""
    session.install("-e", ".[numba,plot,test,dask]")
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
    session.install("-e", ".[numba,test,dask]", "coverage")
    env = {"NUMBA_DISABLE_JIT": "1", **REQUIRED}
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
    session.install("-e", ".[numba,cuda12x,plot,test,dask]")
    session.run(
        "pytest", *session.posargs, env={**REQUIRED, "FASTGRAD_REQUIRE_BACKENDS": "numba,cupy"}
    )


# What a wheel must pass once installed: its embedded data, the public API's
# docstring examples (the Numba backend's too), the book's examples, and the
# models on the NumPy and Numba backends.
WHEEL_SMOKE_TESTS = [
    "tests/test_data.py",
    "tests/test_docs.py",
    "tests/test_book_examples.py",
    "tests/test_models.py",
]

# Run by the wheel session in the fresh environment, outside the source tree.
WHEEL_CHECK = """
import pathlib, fastgrad
origin = pathlib.Path(fastgrad.__file__).resolve()
assert "site-packages" in origin.parts, f"fastgrad imported from {origin}, not the wheel"
(x_train, t_train), (x_test, t_test) = fastgrad.load_mnist(subset="mini")
assert x_train.shape == (10000, 784) and x_test.shape == (2000, 784), "embedded data"
backends = fastgrad.available_backends()
print(f"fastgrad {fastgrad.__version__} from {origin.parent}; backends {backends}")
"""


@nox.session
def wheel(session: nox.Session) -> None:
    """Build the sdist and the wheel; test the wheel as users install it (not editable).

    The wheel goes into this session's fresh virtual environment with the
    ``numba`` and ``test`` extras; a copy of the tests and of the pytest
    settings, outside the source tree, then runs against it, so that
    ``import fastgrad`` cannot find the checkout instead. ``python -m build``
    makes the wheel from the sdist, so a file the sdist lacks fails here too.
    """
    session.install("build")
    tmp = Path(session.create_tmp()).resolve()
    dist = tmp / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    (sdist,) = dist.glob("fastgrad-*.tar.gz")
    (built,) = dist.glob("fastgrad-*.whl")
    session.log(f"built {sdist.name} and {built.name}")
    session.install(f"{built}[numba,test]")
    workdir = tmp / "installed"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree("tests", workdir / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):  # pytest's settings; the README's example
        shutil.copy(name, workdir)
    with session.chdir(workdir):
        session.run("python", "-c", WHEEL_CHECK)
        session.run("fastgrad", "--version")
        session.run(
            "python",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *WHEEL_SMOKE_TESTS,
            *session.posargs,
            # Numba is in the wheel's extras, Dask is not (CI requires it elsewhere)
            env={"FASTGRAD_REQUIRE_BACKENDS": "numba", "FASTGRAD_REQUIRE_EXTRAS": ""},
        )

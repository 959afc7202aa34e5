"""The examples in the public docstrings and in the README run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import import_extra_or_skip

PUBLIC_MODULES = [
    "fastgrad",
    "fastgrad.backends",
    "fastgrad.backends._base",
    "fastgrad.backends.numpy_",
    "fastgrad.functions",
    "fastgrad.gradient",
    "fastgrad.models",
    "fastgrad.gradcheck",
    "fastgrad.train",
    # runs on the CPU without CuPy: its kernels' own source under a simulator
    "fastgrad.backends.cupy.kernels",
]

# The Numba backend's modules with examples; they need numba itself.
NUMBA_MODULES = [
    "fastgrad.backends.numba",
    "fastgrad.backends.numba.threads",
    "fastgrad.backends.numba.sync",
    "fastgrad.backends.numba.simd",
    "fastgrad.backends.numba.vector_math",
]


def run_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
    assert result.attempted > 0, f"{module_name} has no runnable example"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_docstring_examples(module_name):
    run_examples(module_name)


@pytest.mark.jit
@pytest.mark.parametrize("module_name", NUMBA_MODULES)
def test_numba_docstring_examples(module_name):
    pytest.importorskip("numba", reason="the numba backend's examples need numba")
    run_examples(module_name)


README = Path(__file__).resolve().parents[1] / "README.md"


def _fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _without_timing(text: str) -> str:
    # the report's title says how long the check took
    return re.sub(r"\d+(\.\d+)? s\)", "<seconds> s)", text)


_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e[-+]\d+)?")


def _assert_same_report(got: str, expected: str) -> None:
    """The same text and figures; figures under 1e-5 within a factor of 2.

    Those are rounding-level (the differences of agreeing values, their error
    estimates): their last digits move with the machine's BLAS kernels.
    """
    assert _NUMBER.sub("#", got) == _NUMBER.sub("#", expected)
    for shown, wanted in zip(_NUMBER.findall(got), _NUMBER.findall(expected), strict=True):
        value, target = float(shown.replace(",", "")), float(wanted.replace(",", ""))
        if 0 < abs(target) < 1e-5:
            assert 0.5 < value / target < 2, (shown, wanted)
        else:
            assert value == target, (shown, wanted)


def test_readme_library_example_prints_what_the_readme_says(capsys):
    section = README.read_text(encoding="utf-8").split("## The library in fifteen lines", 1)[1]
    code, printed = _fenced(section, "python")[0], _fenced(section, "text")[0]
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    # the first print (True) is shown as a comment in the code, the report below it
    out = _without_timing(capsys.readouterr().out)
    _assert_same_report(out, "True\n" + _without_timing(printed))
    assert "FAIL: b" in out and out.count("  pass") == 1  # the bug found, W passed


def test_the_report_comparison_keeps_figures_and_tolerates_only_rounding_noise():
    row = "W  784x10  7,840  0  2.408e-10  2.622e-06  W[707, 2]: analytic -0.049813039  pass"
    _assert_same_report(row.replace("2.622e-06", "3.323e-06"), row)
    changes = [
        ("7,840", "7,841"),
        ("W[707, 2]", "W[708, 2]"),
        ("-0.049813039", "-0.049813038"),
        ("2.622e-06", "2.622e-05"),
        ("pass", "FAIL"),
    ]
    for old, new in changes:
        with pytest.raises(AssertionError):
            _assert_same_report(row.replace(old, new), row)


@pytest.mark.dask
def test_readme_scaling_out_example_runs_as_a_script(tmp_path):
    # As a user runs it: a file of its own, whose worker processes re-import it.
    import_extra_or_skip("dask", "distributed")
    section = README.read_text(encoding="utf-8").split("## Scaling out", 1)[1]
    script = tmp_path / "scaling_out.py"
    script.write_text(_fenced(section, "python")[0], encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True"

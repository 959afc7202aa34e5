"""The examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

PUBLIC_MODULES = [
    "fastgrad",
    "fastgrad.backends",
    "fastgrad.backends._base",
    "fastgrad.backends.numpy_",
    "fastgrad.functions",
    "fastgrad.gradient",
    "fastgrad.models",
    "fastgrad.gradcheck",
    "fastgrad.backends._cupy_kernels",
]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
    assert result.attempted > 0, f"{module_name} has no runnable example"

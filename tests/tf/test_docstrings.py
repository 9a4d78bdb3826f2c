"""Docstring `>>>` examples of every fused_contrastive module (losses.py, reference.py, ...)."""

import importlib
from pathlib import Path

import pytest
from support import run_doctests

import fused_contrastive

PACKAGE_DIR = Path(fused_contrastive.__file__).resolve().parent
MODULES_WITH_EXAMPLES = sorted(
    "fused_contrastive" if path.stem == "__init__" else f"fused_contrastive.{path.stem}"
    for path in PACKAGE_DIR.glob("*.py")
    if ">>>" in path.read_text()
)


def test_the_public_modules_have_examples():
    assert {"fused_contrastive.losses", "fused_contrastive.reference"} <= set(
        MODULES_WITH_EXAMPLES
    ), MODULES_WITH_EXAMPLES


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_docstring_examples_pass(name):
    results, report = run_doctests(importlib.import_module(name))
    assert results.attempted > 0, f"{name}: no examples found"
    assert results.failed == 0, report

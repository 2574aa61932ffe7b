"""The hook contract stays honest: every hook is documented with its exact signature in
docs/plugins.md, has a docstring, and is implemented somewhere in the tests."""

from __future__ import annotations

import inspect
import re

import pytest

from hub.plugins import hookspecs

from .conftest import ROOT

HOOKS = sorted(name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, "modelhub_spec"))


def test_there_are_hooks() -> None:
    assert {"register_models", "register_targets", "validate_artifact"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented_with_its_signature(name: str) -> None:
    hook = getattr(hookspecs, name)
    assert hook.__doc__ and len(hook.__doc__.strip()) > 40
    signature = name + str(inspect.signature(hook)).replace("'", "")
    assert f"`{signature}`" in (ROOT / "docs" / "plugins.md").read_text(), signature


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_exercised_by_a_test(name: str) -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    assert re.search(rf"def {name}\(", sources), f"no test implements {name}"

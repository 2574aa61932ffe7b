"""The hook contract stays honest: every hook is documented with its exact signature in
docs/plugins.md, has a docstring, and is actually invoked by the server and the builder on a
test plugin that implements it (tests/plugins/hook_recorder)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from hub.plugins import hookspecs
from hub.plugins.manager import HOOK_NAMES, PluginRecord

from .conftest import ROOT, TEST_PLUGINS, link_plugins

HOOKS = sorted(name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, "modelhub_spec"))


def test_there_are_hooks() -> None:
    assert {"register_models", "register_targets", "validate_artifact"} <= set(HOOKS)
    assert set(HOOKS) == HOOK_NAMES


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented_with_its_signature(name: str) -> None:
    hook = getattr(hookspecs, name)
    doc = inspect.getdoc(hook) or ""
    summary = doc.splitlines()[0] if doc else ""
    assert summary.endswith("."), f"{name}: the docstring starts with a one-line summary"
    for parameter in inspect.signature(hook).parameters:
        assert f":param {parameter}:" in doc, f"{name}: parameter {parameter} is not documented"
    assert ":returns:" in doc, f"{name}: the return value is not documented"
    if getattr(hook, "modelhub_spec", {}).get("firstresult"):
        assert "stops at the first non-None result" in doc
    signature = name + str(inspect.signature(hook)).replace("'", "")
    assert f"`{signature}`" in (ROOT / "docs" / "plugins.md").read_text(), signature


@pytest.fixture(scope="module")
def recorded(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[PluginRecord, list[Any]]:
    """Start a server on the hook recorder (with a fresh model repository, so it builds), stop it."""
    folder = link_plugins(tmp_path_factory.mktemp("recorder-plugins"), TEST_PLUGINS / "hook_recorder")
    server = start_server(folder, model_repository=tmp_path_factory.mktemp("recorder-models"))
    assert server.server is not None
    host = server.server.plugins
    assert server.model("recorded").ready
    server.run(server.server.stop(0))
    plugin = host.pm.get_plugin("hook_recorder")
    return host.records["hook_recorder"], list(plugin.CALLS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_invoked_by_the_hub(name: str, recorded: tuple[PluginRecord, list[Any]]) -> None:
    record, calls = recorded
    assert record.status == "loaded" and not record.errors, record.errors
    assert name in record.hooks, f"tests/plugins/hook_recorder does not implement {name}"
    details = [detail for hook, detail in calls if hook == name]
    assert details, f"the server never called {name}"
    if name == "validate_artifact":
        assert details == [("recorded/1", True)]  # once per build, with the loaded artifact
    if name == "server_started":
        assert ("recorded", 1, "ready") in details[0]


def test_hooks_are_called_in_lifecycle_order(recorded: tuple[PluginRecord, list[Any]]) -> None:
    hooks = [hook for hook, _ in recorded[1]]
    assert hooks.index("register_targets") < hooks.index("register_models") < hooks.index("validate_artifact")
    assert hooks.index("validate_artifact") < hooks.index("server_started") < hooks.index("server_stopping")


def test_every_name_importable_from_hub_is_documented() -> None:
    import hub

    section = (ROOT / "docs" / "plugins.md").read_text().split("## Importable from `hub`", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    assert documented == set(hub.__all__)
    for name in hub.__all__:
        assert hasattr(hub, name)


def test_every_deployment_config_key_is_documented() -> None:
    from hub.config import MODEL_KEYS

    text = (ROOT / "docs" / "config.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \| (?:string|integer|number|list|table|one of|boolean)", text, re.M))
    assert documented >= MODEL_KEYS, MODEL_KEYS - documented


def test_every_target_option_is_documented() -> None:
    """Each option the built-in targets read from `spec.options` has a row in docs/config.md."""
    source = "".join(p.read_text() for p in [*(ROOT / "hub" / "runtimes").glob("*.py"), ROOT / "hub" / "spec.py"])
    read = set(re.findall(r"options(?:\.get\(|\[)\"(\w+)\"", source))
    read |= set(re.findall(r"\"(\w+)\" in [\w.]*options", source))
    assert {"compile_mode", "int8_exclude"} <= read, read
    section = (ROOT / "docs" / "config.md").read_text().split("### Target options", 1)[1]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    assert read <= documented, read - documented


def test_every_target_default_tolerance_is_documented() -> None:
    from hub.plugins.manager import PluginHost

    targets = PluginHost(None, entry_points=False).collect_targets()
    rows = {
        name: line
        for line in (ROOT / "docs" / "plugins.md").read_text().splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([\w-]+)`", line.split("|")[1])
    }
    for name, target in targets.items():
        row = rows[name]
        tolerance = target.tolerance
        if not target.check_parity:
            assert "not checked" in row, row
            continue
        stated = {
            key: float(value)
            for key, value in re.findall(r"(atol|rtol|min_top1|min_cosine|max_accuracy_drop) ([\d.e+-]+)", row)
        }
        expected = {key: value for key, value in vars(tolerance).items() if value is not None}
        assert stated == expected, row


def test_the_config_example_builds_the_bundled_digits(tmp_path: Path) -> None:
    """docs/config.md's TOML example, as a user copies it, applies to the bundled digits model and
    builds (its int8_exclude names a module digits has; a pattern that matches none fails the build)."""
    from hub.pipeline.builder import Builder

    spec, host = _config_example_on_digits(tmp_path, "toml")
    assert spec.target == "onnx-int8" and spec.options["int8_exclude"]
    artifact = Builder(tmp_path / "models", host.collect_targets(), host, device="cpu").ensure(spec)
    assert artifact.manifest["status"] == "ok", artifact.manifest


def test_the_yaml_config_example_applies_to_the_bundled_digits(tmp_path: Path) -> None:
    """docs/config.md's YAML example, as a user copies it, applies to the bundled digits model (a
    lower max_batch_size without preferred sizes under it is refused)."""
    spec, _ = _config_example_on_digits(tmp_path, "yaml")
    assert spec.target == "onnx-int8" and spec.batching.max_batch_size == 32


def _config_example_on_digits(tmp_path: Path, language: str) -> tuple[Any, Any]:
    """docs/config.md's example in `language` (toml, yaml), written to a file as a user copies
    it and applied to the bundled digits: (its spec, the plugin host)."""
    from hub.config import DeploymentConfig
    from hub.plugins.manager import PluginHost

    example = re.search(rf"```{language}\n(.*?)```", (ROOT / "docs" / "config.md").read_text(), re.S)
    assert example is not None
    (tmp_path / f"deploy.{language}").write_text(example.group(1))
    deployment = DeploymentConfig.load(tmp_path / f"deploy.{language}")
    host = PluginHost(link_plugins(tmp_path / "plugins", ROOT / "plugins" / "digits"), entry_points=False)
    (spec,) = deployment.apply(host.collect_models())
    return spec, host


def test_the_preprocess_contract_and_the_batching_default_are_documented() -> None:
    """A plugin author learns from docs/plugins.md what `preprocess` gets and returns (its
    signature as ModelSpec declares it) and that a spec without `batching` is not batched."""
    from hub import ModelSpec

    docs = (ROOT / "docs" / "plugins.md").read_text()
    declared = ModelSpec.__dataclass_fields__["preprocess"].type
    assert declared == "Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]] | None"
    assert "`preprocess(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]`" in docs
    assert "object arrays of `bytes`" in docs and "INVALID_ARGUMENT" in docs
    assert ModelSpec.__dataclass_fields__["batching"].default_factory().max_batch_size == 0  # type: ignore[misc]
    assert "`max_batch_size=0` (the default" in docs


def test_every_target_option_is_documented_with_its_default() -> None:
    """docs/plugins.md's `options` row named six of the eight options the built-in targets read
    (not `int8_fold_scales` nor `float8_exclude`). Every option the code reads, found in the
    source as the targets read it (`options.get("x"`, `options["x"]`, `"x" in ...options`), is
    in that row and in docs/config.md's table of target options."""
    read = re.compile(r"""options(?:\.get\(|\[)\s*"(\w+)"|"(\w+)" in [\w.]*options\b""")
    sources = [*sorted((ROOT / "hub" / "runtimes").glob("*.py")), *sorted((ROOT / "hub" / "pipeline").glob("*.py"))]
    options = {a or b for path in [*sources, ROOT / "hub" / "spec.py"] for a, b in read.findall(path.read_text())}
    assert {"compile_mode", "int8_fold_scales", "float8_exclude", "calibration_method"} <= options, options
    (row,) = [
        line for line in (ROOT / "docs" / "plugins.md").read_text().splitlines() if line.startswith("| `options`")
    ]
    config = (ROOT / "docs" / "config.md").read_text()
    for option in sorted(options):
        assert f"`{option}` (" in row, f"docs/plugins.md's options row lacks {option} (with its target and default)"
        assert f"| `{option}` |" in config, f"docs/config.md's table of target options lacks {option}"

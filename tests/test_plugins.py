"""Plugin discovery: a plugins directory, entry points, broken plugins, invalid specs, allow/block lists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc

from hub import hookimpl
from hub.plugins.manager import PluginHost

from .conftest import ROOT

GOOD = """
import numpy as np
from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="{name}",
        build=lambda: (lambda inputs: {{"OUT": inputs["IN"] * 3}}),
        inputs=[TensorSpec("IN", "INT64", (-1, 2))],
        outputs=[TensorSpec("OUT", "INT64", (-1, 2))],
        example_inputs={{"IN": np.ones((1, 2), np.int64)}},
        target="numpy",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return path


def host_for(folder: Path, **kwargs: Any) -> PluginHost:
    host = PluginHost(folder, entry_points=False, **kwargs)
    host.collect_targets()
    return host


@pytest.fixture()
def plugins(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "identity.py").symlink_to(ROOT / "tests" / "plugins" / "identity.py")  # the "numpy" target
    return folder


def test_dropped_in_plugin_is_served(plugins: Path, start_server: Any) -> None:
    write(plugins, "tripler", GOOD.format(name="tripler"))
    server = start_server(plugins)
    client = tc.InferenceServerClient(server.url)
    x = np.array([[1, 2], [3, 4]], np.int64)
    tensor = tc.InferInput("IN", [2, 2], "INT64")
    tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("tripler", [tensor]).as_numpy("OUT"), x * 3)


def test_broken_plugin_beside_a_good_one(plugins: Path, start_server: Any) -> None:
    write(plugins, "good", GOOD.format(name="good_model"))
    write(plugins, "syntax", "def broken(:\n")
    write(plugins, "importer", "import no_such_module_anywhere\n")
    write(
        plugins,
        "raiser",
        """
        from hub import hookimpl
        @hookimpl
        def register_models(register):
            raise RuntimeError("cannot reach the weights")
    """,
    )
    server = start_server(plugins)
    client = tc.InferenceServerClient(server.url)
    assert client.is_model_ready("good_model")
    assert client.is_server_ready()
    records = server.server.plugins.records
    assert records["syntax"].status == "failed"
    assert "syntax" in records["syntax"].errors[0] and "syntax.py" in records["syntax"].errors[0]
    assert "SyntaxError" in records["syntax"].errors[0]
    assert "no_such_module_anywhere" in records["importer"].errors[0]
    assert "cannot reach the weights" in records["raiser"].errors[0]


def test_invalid_specs_are_reported_and_skipped(plugins: Path) -> None:
    write(plugins, "first", GOOD.format(name="shared"))
    write(plugins, "second", GOOD.format(name="shared"))  # duplicate name and version
    write(
        plugins,
        "bad_dtype",
        GOOD.format(name="bad_dtype").replace('TensorSpec("IN", "INT64"', 'TensorSpec("IN", "INT65"'),
    )
    write(plugins, "bad_example", GOOD.format(name="bad_example").replace("np.ones((1, 2)", "np.ones((1, 3)"))
    write(plugins, "bad_example_dtype", GOOD.format(name="bad_example_dtype").replace("np.int64)}", "np.float32)}"))
    host = host_for(plugins)
    specs = host.collect_models()
    assert [s.key for s in specs if s.plugin != "identity"] == ["shared/1"]
    # pluggy calls the newest registration first, and directory plugins register in name order
    assert host.records["second"].models == ["shared/1"]
    assert host.records["first"].models == []
    errors = {name: " ".join(r.errors) for name, r in host.records.items()}
    assert "already registered" in errors["first"] and '"second"' in errors["first"]
    assert "first.py" in errors["first"]
    assert "INT65" in errors["bad_dtype"]
    assert "[1, 3]" in errors["bad_example"] and "[-1, 2]" in errors["bad_example"]
    assert "FP32" in errors["bad_example_dtype"] and "INT64" in errors["bad_example_dtype"]


def test_a_numpy_or_torch_dtype_for_a_datatype_names_the_v2_one(plugins: Path) -> None:
    """A PyTorch user writes TensorSpec("x", "float32", ...) or torch.float32: `modelhub plugins`
    says which V2 name to write."""
    cases = {"np_name": '"float32"', "torch_dtype": "__import__('torch').int64", "text": "str"}
    for name, datatype in cases.items():
        write(plugins, name, GOOD.format(name=name).replace('TensorSpec("IN", "INT64"', f'TensorSpec("IN", {datatype}'))
    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "plugins", "--plugins-dir", str(plugins), "--no-entry-points", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # specs refused
    errors = {p["name"]: " ".join(p["errors"]) for p in json.loads(result.stdout)}
    assert "unknown datatype 'float32' (write 'FP32': datatypes are the V2 names)" in errors["np_name"]
    assert "unknown datatype torch.int64 (write 'INT64': datatypes are the V2 names)" in errors["torch_dtype"]
    assert "unknown datatype <class 'str'> (write 'BYTES': datatypes are the V2 names)" in errors["text"]


def test_misspelled_hook_is_an_error(plugins: Path) -> None:
    write(
        plugins,
        "typo",
        """
        from hub import hookimpl
        @hookimpl
        def register_modles(register):
            pass
    """,
    )
    write(
        plugins,
        "singular",
        """
        from hub import hookimpl
        @hookimpl
        def register_model(register):
            pass
    """,
    )
    host = host_for(plugins)
    assert host.records["typo"].status == "failed"
    assert "register_modles" in host.records["typo"].errors[0]
    assert 'did you mean "register_models"?' in host.records["typo"].errors[0]
    assert host.records["singular"].status == "failed"
    (error,) = host.records["singular"].errors
    assert 'unknown hook "register_model" (did you mean "register_models"?)' in error and "singular.py" in error
    assert host.pm.get_plugin("singular") is None  # not half-registered


def test_hook_with_a_parameter_its_hook_does_not_pass_says_what_the_hook_takes(plugins: Path) -> None:
    write(
        plugins,
        "extra_arg",
        """
        from hub import hookimpl
        @hookimpl
        def register_models(register, extra):
            pass
    """,
    )
    write(plugins, "good", GOOD.format(name="good_model"))
    host = host_for(plugins)
    record = host.records["extra_arg"]
    assert record.status == "failed"
    (error,) = record.errors
    assert "\n" not in error and "extra_arg.py" in error  # one line, naming the file
    assert '"register_models"' in error and "'extra'" in error
    assert "register_models(register)" in error  # what the hook passes: the fix
    assert host.pm.get_plugin("extra_arg") is None
    assert "good_model/1" in [s.key for s in host.collect_models()]


def test_a_registration_hook_that_returns_specs_instead_of_registering_them_is_an_error(plugins: Path) -> None:
    write(
        plugins,
        "returns",
        GOOD.format(name="returned")
        .replace("    register(ModelSpec(", "    return [ModelSpec(")
        .replace("    ))", "    )]"),
    )
    host = host_for(plugins)
    assert "returned/1" not in [s.key for s in host.collect_models()]
    (error,) = host.records["returns"].errors
    assert "returns.py" in error and "register_models returned a list" in error
    assert "call register(...) once per ModelSpec" in error


def test_a_plugin_named_like_a_built_in_says_to_rename_it(plugins: Path) -> None:
    path = write(plugins, "torch", GOOD.format(name="shadowing"))
    host = host_for(plugins)
    (record,) = [r for r in host.records.values() if r.location == str(path)]
    assert record.status == "failed"
    (error,) = record.errors
    assert "torch.py" in error and "hub.runtimes.torch" in error and "rename this one" in error
    assert host.records["torch"].status == "loaded" and host.records["torch"].source == "builtin"


def test_import_error_names_the_line_of_the_plugin_that_raised(plugins: Path) -> None:
    write(plugins, "raises_at_import", 'import numpy\n\nraise RuntimeError("boom at import")\n')
    package = plugins / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import inner\n")
    (package / "inner.py").write_text("x = 1\ny = 1 / 0\n")
    broken = write(plugins, "broken_syntax", "import numpy\n\ndef oops(:\n    pass\n")
    listing = subprocess.run(
        [sys.executable, "-m", "hub.cli", "plugins", "--plugins-dir", str(plugins), "--no-entry-points", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listing.returncode == 1, listing.stderr  # plugins failed to import
    (errors,) = [p["errors"] for p in json.loads(listing.stdout) if p["name"] == "broken_syntax"]
    syntax = f"SyntaxError: invalid syntax (at {broken} line 3)"  # not its repr's tuple of positions
    assert errors == [f'Error importing plugin "broken_syntax" from {broken}: {syntax}']
    host = host_for(plugins)
    (error,) = host.records["raises_at_import"].errors
    assert "boom at import" in error and f"raised at {plugins / 'raises_at_import.py'} line 3" in error
    (error,) = host.records["pkg"].errors
    assert "ZeroDivisionError" in error and f"raised at {package / 'inner.py'} line 2" in error


def test_import_error_names_the_line_with_a_relative_plugins_dir(plugins: Path) -> None:
    """`--plugins-dir plugins` (the default is relative): the plugin's location is relative, the
    traceback's frames absolute, and the error still names the line that raised."""
    write(plugins, "raises_at_import", 'import numpy\n\nraise RuntimeError("boom at import")\n')
    listing = subprocess.run(
        [sys.executable, "-m", "hub.cli", "plugins", "--plugins-dir", plugins.name, "--no-entry-points", "--json"],
        capture_output=True, text=True, timeout=120, cwd=plugins.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert listing.returncode == 1, listing.stderr
    (errors,) = [p["errors"] for p in json.loads(listing.stdout) if p["name"] == "raises_at_import"]
    assert f"raised at {plugins / 'raises_at_import.py'} line 3" in errors[0], errors


def test_a_model_that_fails_to_load_is_logged_with_its_plugin_and_file(
    plugins: Path, start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(plugins, "typo_target", GOOD.format(name="typo_target").replace('target="numpy"', 'target="numpi"'))
    with caplog.at_level("ERROR", logger="modelhub.repository"):
        start_server(plugins)
    (line,) = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
    assert "unknown target 'numpi' (did you mean 'numpy'?)" in line
    assert f'(registered by plugin "typo_target", {path})' in line


def test_build_with_an_unknown_target_fails_that_row_without_a_traceback(plugins: Path, tmp_path: Path) -> None:
    write(plugins, "good", GOOD.format(name="good_model"))
    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "build", "--plugins-dir", str(plugins), "--no-entry-points",
         "--model-repository", str(tmp_path / "models"), "--device", "cpu", "--target", "onnx-int9", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (row,) = [r for r in json.loads(result.stdout) if r["model"] == "good_model"]
    assert row["status"] == "failed" and "unknown target 'onnx-int9' (did you mean 'onnx-int8'?)" in row["problem"]


def test_build_fails_when_a_plugin_failed_and_says_so_after_the_table(plugins: Path, tmp_path: Path) -> None:
    """A plugin whose import fails, or whose spec is refused, has no row in `modelhub build`'s
    table: the build said nothing after the table and exited 0, so a CI or image build that
    prebuilds artifacts passed without that plugin's models."""
    write(plugins, "good", GOOD.format(name="good_model"))
    broken = write(plugins, "broken", "import transformerz\n")
    write(plugins, "refused", GOOD.format(name="refused").replace('"INT64", (-1, 2))]', '"int64", (-1, 2))]', 1))
    result = subprocess.run(
        [sys.executable, "-m", "hub.cli", "build", "--plugins-dir", str(plugins), "--no-entry-points",
         "--model-repository", str(tmp_path / "models"), "--device", "cpu", "--no-measure"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "good_model/1" in result.stdout and "ok" in result.stdout
    table_end = result.stdout.rstrip().splitlines()[-1]
    assert table_end.startswith("└")
    tail = result.stderr[result.stderr.rindex("good_model/1 [numpy]") :]  # after the progress lines
    assert f'Error importing plugin "broken" from {broken}: ModuleNotFoundError' in tail
    assert "unknown datatype 'int64' (write 'INT64'" in tail


def test_hook_named_function_without_hookimpl_is_a_warning(plugins: Path) -> None:
    path = write(
        plugins,
        "unmarked",
        """
        from hub import hookimpl
        def register_models(register):
            raise AssertionError("pluggy never calls an unmarked function")
        @hookimpl
        def register_targets(register):
            pass
    """,
    )
    host = host_for(plugins)
    host.collect_models()
    record = host.records["unmarked"]
    assert record.status == "loaded" and not record.errors
    assert record.hooks == ["register_targets"]
    (warning,) = record.warnings
    assert '"register_models"' in warning and "@hookimpl" in warning and str(path) in warning
    assert not host.records["identity"].warnings  # its hooks are all marked


def test_a_plugin_implementing_no_hook_is_a_warning(plugins: Path) -> None:
    path = write(plugins, "helpers", "def shapes():\n    return (1, 2)\n")
    host = host_for(plugins)
    record = host.records["helpers"]
    assert record.status == "loaded" and not record.errors and record.hooks == []
    (warning,) = record.warnings
    assert str(path) in warning and "implements no hook" in warning and "@hookimpl" in warning
    assert not host.records["identity"].warnings


def test_package_plugin_relative_imports(plugins: Path) -> None:
    package = plugins / "relative"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from hub import hookimpl
            from . import shapes
            from .model import spec

            @hookimpl
            def register_models(register):
                register(spec(shapes.ROW))
            """
        )
    )
    (package / "shapes.py").write_text("ROW = (-1, 2)\n")
    (package / "model.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from hub import ModelSpec, TensorSpec
            from .shapes import ROW

            def spec(shape):
                assert shape == ROW
                return ModelSpec(
                    name="relative",
                    build=lambda: (lambda inputs: {"OUT": inputs["IN"] + 1}),
                    inputs=[TensorSpec("IN", "INT64", shape)],
                    outputs=[TensorSpec("OUT", "INT64", shape)],
                    example_inputs={"IN": np.ones((1, 2), np.int64)},
                    target="numpy",
                )
            """
        )
    )
    host = host_for(plugins)
    (spec,) = [s for s in host.collect_models() if s.name == "relative"]
    assert host.records["relative"].errors == []
    forward: Any = spec.build()
    np.testing.assert_array_equal(forward({"IN": np.array([[1, 2]])})["OUT"], [[2, 3]])
    assert {p.name for p in spec.sources} == {"__init__.py", "model.py", "shapes.py"}


def test_two_hosts_do_not_share_plugin_modules(plugins: Path) -> None:
    write(
        plugins,
        "counter",
        """
        from hub import hookimpl
        LOADS = []
        @hookimpl
        def register_targets(register):
            LOADS.append(1)
    """,
    )
    first, second = host_for(plugins), host_for(plugins)
    one, two = first.pm.get_plugin("counter"), second.pm.get_plugin("counter")
    assert one is not two and one.__name__ != two.__name__
    assert sys.modules[one.__name__] is one and sys.modules[two.__name__] is two
    assert one.LOADS == [1] and two.LOADS == [1]  # each host's call reached only its own module
    first.close()
    assert one.__name__ not in sys.modules and sys.modules[two.__name__] is two
    second.close()


BAD_VALIDATORS = {
    "raises": "raise RuntimeError('validator crashed')",
    "returns_a_string": "return 'looks fine'",
    "problems_not_a_list": "return {'problems': 'too far from eager'}",
    "returns_numpy_figures": "return {'score': __import__('numpy').float32(0.5)}",
}


@pytest.mark.parametrize("case", sorted(BAD_VALIDATORS))
def test_bad_validator_names_its_plugin_and_fails_the_build(plugins: Path, tmp_path: Path, case: str) -> None:
    from hub.errors import BuildError, PluginError
    from hub.pipeline.builder import Builder

    write(plugins, "good", GOOD.format(name="validated"))
    path = write(
        plugins,
        "checker",
        f"""
        from hub import hookimpl
        @hookimpl
        def validate_artifact(spec, runtime):
            {BAD_VALIDATORS[case]}
    """,
    )
    host = host_for(plugins)
    targets = host.collect_targets()
    (spec,) = [s for s in host.collect_models() if s.name == "validated"]
    with pytest.raises(PluginError, match='plugin "checker"') as caught:
        host.validate_artifact(spec, _numpy_runtime(), spec.examples(), None, spec.tolerance_for(targets["numpy"]))
    assert str(path) in str(caught.value) and "validated/1" in str(caught.value)
    builder = Builder(tmp_path / "models", targets, host, device="cpu")
    with pytest.raises(BuildError, match='plugin "checker"') as built:
        builder.ensure(spec)
    assert "PluginError(" not in str(built.value) and "\\'" not in str(built.value)  # the message, not its repr
    assert builder.read_manifest(spec) is None  # no verdict was recorded: a fixed validator rebuilds


def test_an_artifact_that_raises_under_a_validator_is_the_artifacts_fault(plugins: Path, tmp_path: Path) -> None:
    """The model fails on the inputs it is checked on: the build names the model, its error and
    the line in its plugin, not 'plugin "validation" raised in validate_artifact'."""
    from hub.errors import BuildError
    from hub.pipeline.builder import Builder

    path = write(
        plugins,
        "fragile",
        GOOD.format(name="fragile").replace(
            'build=lambda: (lambda inputs: {{"OUT": inputs["IN"] * 3}}),'.replace("{{", "{").replace("}}", "}"),
            "build=lambda: fragile,",
        )
        + "\n\ndef fragile(inputs):\n    raise ValueError('no row may be 1')\n",
    )
    host = host_for(plugins)
    targets = host.collect_targets()
    (spec,) = [s for s in host.collect_models() if s.name == "fragile"]
    with pytest.raises(BuildError) as built:
        Builder(tmp_path / "models", targets, host, device="cpu").ensure(spec)
    line = path.read_text().splitlines().index("    raise ValueError('no row may be 1')") + 1
    assert str(built.value) == (
        "model 'fragile': the artifact raised while plugin \"validation\" (hub.pipeline.validation) checked it: "
        f"ValueError: no row may be 1 (raised at {path} line {line})"
    )


def _numpy_runtime() -> Any:
    from .plugins.identity import NumpyRuntime

    return NumpyRuntime(lambda inputs: {"OUT": inputs["IN"] * 3})


def test_block_and_allow_lists(plugins: Path) -> None:
    write(plugins, "a", GOOD.format(name="model_a"))
    write(plugins, "b", GOOD.format(name="model_b"))
    blocked = host_for(plugins, block={"a"})
    assert [s.name for s in blocked.collect_models() if s.plugin != "identity"] == ["model_b"]
    assert blocked.records["a"].status == "disabled"
    allowed = host_for(plugins, allow={"a", "identity"})
    assert [s.name for s in allowed.collect_models() if s.plugin != "identity"] == ["model_a"]


def test_allow_and_block_lists_naming_no_plugin_are_warned_about(
    plugins: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(plugins, "good", GOOD.format(name="good_model"))
    with caplog.at_level("WARNING", logger="modelhub.plugins"):
        host_for(plugins, allow={"god"}, block={"identty", "onnx"})
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any('MODELHUB_PLUGINS names "god"' in line and 'did you mean "good"?' in line for line in lines), lines
    assert any('MODELHUB_DISABLE_PLUGINS names "identty"' in line and '"identity"' in line for line in lines), lines
    assert not any('"onnx"' in line for line in lines)  # a real (built-in) name is not warned about


def test_entry_point_plugins_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "ep_plugin").mkdir(parents=True)
    (site / "ep_plugin" / "__init__.py").write_text(textwrap.dedent(GOOD.format(name="from_entry_point")))
    dist = site / "ep_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[modelhub]\nep = ep_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    host = PluginHost(None, entry_points=True, extra={"identity": _identity_module()})
    host.collect_targets()
    specs = host.collect_models()
    (spec,) = [s for s in specs if s.name == "from_entry_point"]
    assert spec.plugin == "ep"
    assert host.records["ep"].source == "entry-point"
    assert host.records["ep"].models == ["from_entry_point/1"]
    assert (site / "ep_plugin" / "__init__.py").resolve() in spec.sources  # the cache key covers its files


def test_an_entry_point_plugins_sibling_module_is_in_its_cache_key(plugins: Path, tmp_path: Path) -> None:
    """docs/plugins.md's entry point, `my_models = "my_package.plugin"`, with the model in
    `my_package/model.py`: editing the model rebuilds it (the key once held plugin.py alone, so
    `modelhub build` and `serve` kept the stale artifact)."""
    site = tmp_path / "site"
    package = site / "my_package"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("FACTOR = 3\n")
    plugin = GOOD.format(name="installed").replace('inputs["IN"] * 3', 'inputs["IN"] * FACTOR')
    (package / "plugin.py").write_text("from my_package.model import FACTOR\n" + textwrap.dedent(plugin))
    dist = site / "my_package-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[modelhub]\nmy_models = my_package.plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}

    def build() -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "hub.cli", "build", "installed", "--plugins-dir", str(plugins),
             "--model-repository", str(tmp_path / "models"), "--device", "cpu", "--no-measure", "--json"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (row,) = json.loads(result.stdout)
        return dict(row)

    assert build()["status"] == "ok"
    assert build()["status"] == "ok (cached)"
    (package / "model.py").write_text("FACTOR = 5\n")
    assert build()["status"] == "ok"  # rebuilt, not the artifact of FACTOR = 3
    manifest = json.loads((tmp_path / "models" / "installed" / "1" / "manifest.json").read_text())
    assert {"model.py", "plugin.py", "__init__.py"} <= set(manifest["key_parts"]["sources"]), manifest["key_parts"]


def _identity_module() -> Any:
    from .plugins import identity

    return identity


def test_object_plugins_and_lifecycle_hooks(plugins: Path, start_server: Any) -> None:
    events: list[tuple[str, Any]] = []

    class Recorder:
        @hookimpl
        def server_started(self, server: Any) -> None:
            events.append(("started", server.models()))

        @hookimpl
        def server_stopping(self, server: Any) -> None:
            events.append(("stopping", server.grpc_port))

    write(plugins, "good", GOOD.format(name="watched"))
    server = start_server(plugins, extra_plugins={"recorder": Recorder()})
    assert events and events[0][0] == "started"
    assert ("watched", 1, "ready") in events[0][1]
    server.run(server.server.stop(0))
    assert events[-1] == ("stopping", server.server.grpc_port)


def test_plugins_command_table_and_json_say_the_same(plugins: Path) -> None:
    write(plugins, "good", GOOD.format(name="listed"))
    write(plugins, "syntax", "def broken(:\n")
    write(plugins, "unmarked", "def server_started(server):\n    pass\n")
    command = [sys.executable, "-m", "hub.cli", "plugins", "--plugins-dir", str(plugins), "--no-entry-points"]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr  # "syntax" failed
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["good"]["models"] == ["listed/1"]
    assert records["syntax"]["status"] == "failed"
    assert "SyntaxError" in records["syntax"]["errors"][0]
    assert "@hookimpl" in records["unmarked"]["warnings"][0]
    table = subprocess.run(command, capture_output=True, text=True).stdout
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line and not line.startswith(" ")}
    for name, record in records.items():
        row = re.split(r"\s{2,}", rows[name].strip())
        assert record["source"] in row and record["status"] in row, rows[name]
        for key in ("hooks", "models", "targets"):
            assert (", ".join(record[key]) or "-") in row, (key, rows[name])
        assert f"  {name}: {record['location']}" in table
        for note in record["errors"] + record["warnings"]:
            assert f"  {name}: {note}" in table
    assert "\nerrors:" in table and "\nwarnings:" in table


def test_plugins_command_says_refused_and_exits_1_as_build_does(plugins: Path) -> None:
    """A plugin whose every spec was refused was listed as `loaded` (the refusal only in the
    errors below the table), and `modelhub plugins` exited 0 even for a plugin that failed to
    import, unlike `modelhub build`: a CI step listing the plugins passed over both."""
    write(plugins, "good", GOOD.format(name="good_model"))
    refused = GOOD.format(name="refused").replace('"INT64", (-1, 2))]', '"int64", (-1, 2))]', 1)
    write(plugins, "refused", refused)
    no_outputs = '    register(ModelSpec(name="partly_bad", build=dict, inputs=[], outputs=[], example_inputs={}))\n'
    write(plugins, "partly", GOOD.format(name="partly_good") + no_outputs)
    command = [sys.executable, "-m", "hub.cli", "plugins", "--plugins-dir", str(plugins), "--no-entry-points"]
    listing = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 1, listing.stderr
    status = {r["name"]: r["status"] for r in json.loads(listing.stdout)}
    assert status["refused"] == "refused" and status["partly"] == "partly refused", status
    assert status["good"] == "loaded" and status["identity"] == "loaded", status
    table = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert table.returncode == 1
    assert re.search(r"^refused\s+directory\s+refused\s", table.stdout, re.M), table.stdout
    (plugins / "refused.py").unlink()
    (plugins / "partly.py").unlink()
    write(plugins, "broken", "import transformerz\n")
    assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode == 1
    (plugins / "broken.py").unlink()
    write(plugins, "unmarked", "def server_started(server):\n    pass\n")  # a warning: not a failure
    assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode == 0


OVERRIDES = """
import numpy as np
import torch
from hub import BatchPolicy, ModelSpec, Target, TensorSpec, hookimpl
from hub.runtimes.torch import TorchRuntime

class Shifted(TorchRuntime):
    def run(self, inputs):
        return {name: value + 1.0 for name, value in super().run(inputs).items()}

@hookimpl
def register_targets(register):
    # Unmarked: called before the built-ins, which are trylast, so this "torch" replaces theirs.
    register(Target(name="torch", build=lambda ctx: ctx.module(), platform="shifted_eager", check_parity=False,
                    load=lambda ctx: Shifted(ctx.module(), ctx.spec, ctx.device)))
    register(Target(name="plain", build=lambda ctx: None,
                    load=lambda ctx: TorchRuntime(ctx.module(), ctx.spec, ctx.device)))

@hookimpl
def register_models(register):
    register(ModelSpec(
        name="overridden",
        build=lambda: torch.nn.Identity(),
        inputs=[TensorSpec("x", "FP32", (-1, 2))],
        outputs=[TensorSpec("y", "FP32", (-1, 2))],
        example_inputs={"x": np.ones((2, 2), np.float32)},
        target="plain",
        batching=BatchPolicy(max_batch_size=4),
    ))
"""


def test_a_plugin_target_replaces_a_built_in_one_and_provides_the_parity_reference(
    plugins: Path, tmp_path: Path
) -> None:
    from hub.errors import BuildError
    from hub.pipeline.builder import Builder

    write(plugins, "overrides", OVERRIDES)
    host = PluginHost(plugins, entry_points=False)
    targets = host.collect_targets()
    assert targets["torch"].plugin == "overrides" and targets["torch"].platform == "shifted_eager"
    assert targets["onnx"].plugin == "onnx"  # the other built-ins stay
    builtin = host.records["torch"]
    assert builtin.status == "loaded" and builtin.errors == [] and "torch" not in builtin.targets
    assert "torch" in host.records["overrides"].targets
    (spec,) = [s for s in host.collect_models() if s.name == "overridden"]
    # The reference is the plugin's "torch" (eager + 1), so an exact artifact strays from it by 1.
    with pytest.raises(BuildError, match="strays from eager"):
        Builder(tmp_path / "models", targets, host, device="cpu").ensure(spec)
    manifest = json.loads((tmp_path / "models" / "overridden" / "1" / "manifest.json").read_text())
    assert manifest["validation"]["max_abs_err"] == pytest.approx(1.0)


def test_two_plugins_registering_one_target_is_still_an_error(plugins: Path) -> None:
    target = """
        from hub import Target, hookimpl
        @hookimpl
        def register_targets(register):
            register(Target(name="twice", build=lambda ctx: None, load=lambda ctx: None))
    """
    write(plugins, "first", target)
    write(plugins, "second", target)
    host = host_for(plugins)
    (error,) = host.records["first"].errors  # called after "second": newest registration first
    assert "target 'twice' is already registered by plugin \"second\"" in error

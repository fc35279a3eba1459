"""Users' blocks from files, modules, the environment and installed packages, used like built-in blocks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from blockgraph import builder
from blockgraph.blocks import REGISTRY
from blockgraph.builder import PluginError, SpecError
from blockgraph.builder.plugins import load_plugin

EXAMPLE = ROOT / "examples" / "blockgraph-highway"
PLUGIN_FILE = EXAMPLE / "blockgraph_highway.py"
SPEC = EXAMPLE / "highway.yaml"

BLOCK_TEMPLATE = """
import torch
from blockgraph.blocks import Block, BlockParams, Port, TensorType, register

@register({name!r}, family="test")
class Plugged(Block):
    \"\"\"A test block that scales its input.\"\"\"

    in_ports = (Port("x"),)

    @classmethod
    def infer(cls, p, x: TensorType) -> TensorType:
        {infer}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return {forward}
"""


@pytest.fixture(autouse=True)
def clean_registry(restored_registry):
    """Plugins register into the one global registry; put it back as it was after each test."""


def plugin_file(tmp_path: Path, name: str = "plugged", infer: str = "return x", forward: str = "2 * x") -> Path:
    path = tmp_path / f"{name}_plugin.py"
    path.write_text(BLOCK_TEMPLATE.format(name=name, infer=infer, forward=forward))
    return path


def one_block_spec(block: str, width: int = 4) -> dict:
    return {
        "name": "p",
        "inputs": {"x": {"shape": ["b", width]}},
        "nodes": {"n": {"type": block, "in": "x"}},
        "outputs": "n",
    }


def test_file_plugin_through_the_cli(run_cli):
    without = run_cli("build", SPEC)
    assert without.code == 1 and "unknown block type 'highway'" in without.stderr and "--plugin" in without.stderr
    built = run_cli("--plugin", PLUGIN_FILE, "build", SPEC)
    assert built.code == 0, built.stderr
    assert "[4, 32]" in built.stdout
    listing = run_cli("--plugin", PLUGIN_FILE, "blocks", "list")
    row = next(line for line in listing.stdout.splitlines() if "highway" in line)
    assert "plugin blockgraph_highway.py" in row and "Gated residual" in row
    shown = run_cli("--plugin", PLUGIN_FILE, "blocks", "show", "highway")
    assert "gate_bias" in shown.stdout


def test_plugin_block_gets_inspect_schema_and_validation(run_cli):
    inspected = run_cli("--plugin", PLUGIN_FILE, "inspect", SPEC)
    assert inspected.code == 0 and "highway" in inspected.stdout and "[batch, 32]" in inspected.stdout
    schema = run_cli("--plugin", PLUGIN_FILE, "schema")
    assert '"params.highway"' in schema.stdout
    bad = SPEC.read_text().replace("{dim: 32}", "{dim: 16}")
    path = Path(inspected.stdout and os.environ.get("TMPDIR", "/tmp")) / "highway_bad.yaml"
    path.write_text(bad)
    result = run_cli("--plugin", PLUGIN_FILE, "validate", path)
    assert result.code == 1 and "dim is 16" in " ".join(result.stderr.split())


def test_module_plugin_and_environment_variable(tmp_path, monkeypatch, run_cli):
    plugin_file(tmp_path, "tripled", forward="3 * x")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = builder.build(one_block_spec("tripled"), plugins=["tripled_plugin"])
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), 3 * x)
    plugin_file(tmp_path, "quadrupled", forward="4 * x")
    result = run_cli("blocks", "list", "quad*", env={"BLOCKGRAPH_PLUGINS": "quadrupled_plugin"})
    assert result.code == 0 and "plugin quadrupled_plugin" in result.stdout


def test_api_plugins_and_the_module_computes_what_it_says():
    model = builder.build(SPEC, plugins=[str(PLUGIN_FILE)]).eval()
    x = torch.randn(4, 32)
    hidden = model.hidden(x)
    g = torch.sigmoid(model.gate.w_g(x))
    torch.testing.assert_close(model(x), g * hidden + (1 - g) * x)


def test_installed_package_is_found_through_its_entry_point(tmp_path):
    """A real distribution on sys.path (dist-info with entry_points.txt), as `pip install` leaves it."""
    site = tmp_path / "site"
    dist = site / "blockgraph_highway-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "blockgraph_highway.py").write_text(PLUGIN_FILE.read_text())
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: blockgraph-highway\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[blockgraph.blocks]\nhighway = blockgraph_highway\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "COLUMNS": "200"}
    listing = subprocess.run(
        [sys.executable, "-m", "blockgraph.cli", "blocks", "list", "highway"], env=env, capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    assert "package blockgraph-highway" in listing.stdout
    built = subprocess.run(
        [sys.executable, "-m", "blockgraph.cli", "build", str(SPEC)], env=env, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    assert "[4, 32]" in built.stdout


def test_broken_installed_package_warns_and_builtins_keep_working(tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_blocks-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "broken_blocks.py").write_text("raise RuntimeError('half-installed')\n")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-blocks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[blockgraph.blocks]\nbroken = broken_blocks\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "COLUMNS": "200"}
    spec = ROOT / "specs" / "tiny_encoder.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "blockgraph.cli", "validate", str(spec)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "package broken-blocks failed to load: RuntimeError: half-installed" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_name_clash_names_both_sources_unless_override(tmp_path):
    clash = plugin_file(tmp_path, "linear")
    with pytest.raises(PluginError) as info:
        load_plugin(str(clash))
    message = str(info.value)
    assert "'linear'" in message and "linear_plugin.py" in message and "built-in" in message
    assert REGISTRY.get("linear").source == "built-in"
    assert builder.build(
        one_block_spec("linear")
        | {"nodes": {"n": {"type": "linear", "in": "x", "params": {"in_features": 4, "out_features": 2}}}}
    )
    load_plugin(str(clash), allow_override=True)
    assert REGISTRY.get("linear").source == "plugin linear_plugin.py"


def test_failing_plugin_is_rolled_back_and_reported_by_name(tmp_path):
    path = tmp_path / "halfway.py"
    path.write_text(
        BLOCK_TEMPLATE.format(name="first_half", infer="return x", forward="x") + "\nraise ValueError('oops')\n"
    )
    with pytest.raises(PluginError, match=r"plugin halfway.py failed to load: ValueError: oops"):
        load_plugin(str(path))
    assert "first_half" not in REGISTRY
    assert "linear" in REGISTRY


def test_plugin_with_syntax_error_points_at_the_line(tmp_path, run_cli):
    path = tmp_path / "typo.py"
    path.write_text("from blockgraph.blocks import register\n\ndef broken(:\n    pass\n")
    result = run_cli("--plugin", path, "blocks")
    message = " ".join(result.stderr.split())
    assert result.code == 1 and "plugin typo.py has a syntax error" in message and "typo.py:3" in message


def test_missing_plugin_file_and_module(run_cli):
    result = run_cli("--plugin", "no/such/file.py", "validate", ROOT / "specs" / "tiny_encoder.yaml")
    assert result.code == 1 and "file not found" in result.stderr
    result = run_cli("--plugin", "no_such_module_here", "validate", ROOT / "specs" / "tiny_encoder.yaml")
    assert result.code == 1 and "ModuleNotFoundError" in result.stderr and "named by --plugin" in result.stderr


def test_a_shape_rule_that_lies_is_caught_at_build_naming_the_plugin(tmp_path, run_cli, write_spec):
    liar = plugin_file(tmp_path, "liar", infer="return x.with_last(8)", forward="x")
    spec = write_spec(one_block_spec("liar") | {"dims": {"b": 2}})
    result = run_cli("--plugin", liar, "build", spec)
    message = " ".join(result.stderr.split())
    assert result.code == 1
    assert "block 'liar' (from plugin liar_plugin.py): produced [2, 4]" in message and "promised [2, 8]" in message


def test_a_crashing_shape_rule_is_reported_as_the_blocks_bug(tmp_path):
    path = plugin_file(tmp_path, "crashy", infer="return x.shape.missing")
    with pytest.raises(SpecError, match=r"block 'crashy' \(from plugin crashy_plugin.py\): its shape rule crashed"):
        builder.typed_graph(one_block_spec("crashy"), plugins=[str(path)])


def test_a_spec_never_imports_code_by_itself(tmp_path, write_spec, run_cli):
    marker = tmp_path / "imported"
    (tmp_path / "sneaky.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        for block_type in ("sneaky", "sneaky.Block"):
            result = run_cli("validate", write_spec(one_block_spec(block_type)))
            assert result.code == 1
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists()


def test_registration_rejects_malformed_blocks(tmp_path):
    path = tmp_path / "malformed.py"
    path.write_text(
        textwrap.dedent(
            '''
            import torch
            from blockgraph.blocks import Block, Port, register

            @register("malformed")
            class Malformed(Block):
                """Its forward does not take its ports."""
                in_ports = (Port("x"), Port("y"))

                def forward(self, x):
                    return x
            '''
        )
    )
    with pytest.raises(PluginError, match=r"forward\('x',\) must take the in_ports \('x', 'y'\)"):
        load_plugin(str(path))


def rule_plugin(tmp_path: Path, name: str, rule: str) -> Path:
    """A plugin block whose shape rule and forward work, with one more rule (`flops`, `limits`) as given."""
    path = plugin_file(tmp_path, name, forward="x")
    path.write_text(path.read_text() + textwrap.indent(textwrap.dedent(rule), "    "))
    return path


def test_a_crashing_flops_rule_costs_the_node_its_formula_not_the_report(tmp_path, run_cli, write_spec):
    path = rule_plugin(
        tmp_path, "badflops", "@classmethod\ndef flops(cls, p, inputs, outputs):\n    return {}['rows']\n"
    )
    spec = write_spec(one_block_spec("badflops") | {"dims": {"b": 2}})
    for fmt in ("tree", "table", "json"):
        result = run_cli("--plugin", path, "inspect", spec, "--format", fmt)
        assert result.exception is None and "Traceback" not in result.stderr + result.stdout, result.exception
        assert result.code == 0, result.stderr
    shown = " ".join(run_cli("--plugin", path, "inspect", spec).stdout.split())
    assert "no formula for badflops" in shown and "formula of 1 node(s) failed, e.g. n (badflops): KeyError" in shown
    typed = builder.typed_graph(spec, plugins=[str(path)])
    from blockgraph.builder.analysis import analyse
    from blockgraph.builder.pipeline import compile_graph

    cost = analyse(typed, compile_graph(typed, device="meta")).nodes["n"]
    assert cost.flops_analytic is None and cost.flops == 0
    assert cost.flops_error == "KeyError: 'rows'"


def test_a_crashing_limits_rule_is_reported_as_the_blocks_bug(tmp_path, run_cli, write_spec):
    path = rule_plugin(tmp_path, "badlimits", "@classmethod\ndef limits(cls, p, x):\n    return (x.rows,)\n")
    spec = write_spec(one_block_spec("badlimits") | {"dims": {"b": 2}})
    for command in ("build", "inspect", "validate"):
        result = run_cli("--plugin", path, command, spec)
        message = " ".join(result.stderr.split())
        assert result.exception is None and "Traceback" not in result.stderr + result.stdout, result.exception
        assert result.code == 1, result.stdout
        assert "block 'badlimits' (from plugin badlimits_plugin.py): its limits rule crashed: AttributeError" in message
        assert "spec.yaml:" in message and "node n" in message

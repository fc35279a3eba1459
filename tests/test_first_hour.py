"""What a new user met in the first hour (issue 23, items 5 and 6): options where they typed them, usage
lines as people write them, hints for arithmetic and misspelt variables, repeats that change width, warm-up
longer than the run, re-imports over edited imports, and tables that fit 80 columns."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

PLUGIN = ROOT / "examples" / "blockgraph-highway" / "blockgraph_highway.py"
HIGHWAY_SPEC = ROOT / "examples" / "blockgraph-highway" / "highway.yaml"


@pytest.fixture(autouse=True)
def clean_registry(restored_registry):
    yield


@pytest.mark.parametrize("given", [["--plugin", str(PLUGIN)], [f"--plugin={PLUGIN}"], ["-p", str(PLUGIN)]])
def test_the_plugin_option_works_after_the_command_too(run_cli, given):
    built = run_cli("build", HIGHWAY_SPEC, *given)
    assert built.code == 0, built.stderr
    listed = run_cli("blocks", "list", "highway", *given, "--allow-override")
    assert listed.code == 0 and "highway" in listed.stdout, listed.stderr


def test_usage_lines_read_as_people_write_them(run_cli):
    usages = {}
    for command in ("build", "validate", "translate", "export"):
        shown = run_cli(command, "--help")
        usages[command] = re.search(r"Usage: (.*)", shown.stdout).group(1).strip()
    assert usages["build"] == "blockgraph build [OPTIONS] SPEC"
    assert usages["validate"] == "blockgraph validate [OPTIONS] SPECS..."
    assert usages["translate"] == "blockgraph translate [OPTIONS] MODEL [SENTENCE]..."
    assert not any("{" in usage or "[[" in usage for usage in usages.values()), usages


LM = """
name: lm
vars: {vocab: 100, d_model: 64, width: 64}
dims: {batch: 2, seq: 4}
inputs:
  tokens: {dtype: int64, shape: [batch, seq], high: "${vocab}"}
nodes:
  embed: {type: token_embedding, params: {vocab: "${vocab}", dim: "${d_model}"}, in: tokens}
  proj: {type: linear, params: {in_features: "${width}", out_features: 128}, in: embed, repeat: 3}
  gen: {type: generator, params: {d_model: 128, vocab: "${vocab}"}, in: proj}
outputs: gen
"""

WIDENING_SUBGRAPH = """
name: lm
vars: {vocab: 100}
dims: {batch: 2, seq: 4}
inputs:
  tokens: {dtype: int64, shape: [batch, seq], high: "${vocab}"}
blocks:
  widen:
    inputs: [x]
    nodes:
      norm: {type: layer_norm, params: {dim: 64}, in: x}
      up: {type: linear, params: {in_features: 64, out_features: 96}, in: norm}
    outputs: up
nodes:
  embed: {type: token_embedding, params: {vocab: "${vocab}", dim: 64}, in: tokens}
  stack: {type: widen, repeat: 2, in: embed}
  gen: {type: generator, params: {d_model: 96, vocab: "${vocab}"}, in: stack}
outputs: gen
"""


@pytest.mark.parametrize("text", [LM, WIDENING_SUBGRAPH], ids=["node", "sub-graph"])
def test_a_repeat_that_changes_width_says_each_copy_feeds_the_next(run_cli, write_spec, text):
    checked = run_cli("validate", write_spec(text))
    message = " ".join(checked.stderr.split())
    assert checked.code == 1 and "each copy of `repeat:" in message and "feeds the next" in message, message
    assert "set in_features" not in message and "set dim" not in message, message


def test_a_fraction_where_a_size_goes_points_to_integer_division(run_cli, write_spec):
    checked = run_cli("validate", write_spec(LM.replace('"${width}"', '"${d_model / 3}"')))
    message = " ".join(checked.stderr.split())
    assert checked.code == 1 and "fractional part" in message and "`//`" in message, message


@pytest.mark.parametrize(
    "old, new",
    [
        ('dim: "${d_model}"', 'dim: "${d_modle}"'),
        ("width: 64}", 'width: "${d_modle}"}'),
        ('high: "${vocab}"', 'high: "${vocabb}"'),
        ("repeat: 3", 'repeat: "${d_modle // 16}"'),
    ],
)
def test_a_misspelt_variable_gets_a_did_you_mean_wherever_it_is_used(run_cli, write_spec, old, new):
    checked = run_cli("validate", write_spec(LM.replace(old, new)))
    message = " ".join(checked.stderr.split())
    assert checked.code == 1 and "unknown variable" in message and "did you mean" in message, message


def test_an_edited_import_is_named_as_one_and_decoding_says_the_edit_waits_for_train(tmp_path, run_cli):
    import hf_dirs

    _, _, hf = hf_dirs.gpt2(tmp_path)
    out = tmp_path / "opus"
    assert run_cli("import", hf, "--out", out).code == 0
    generated = run_cli("generate", out, "I want", "--max-new", "2")
    assert generated.code == 0 and "edited" not in generated.stderr, generated.stderr
    spec = out / "spec.yaml"
    spec.write_text(spec.read_text().replace("dropout: 0.1", "dropout: 0.2"))
    again = run_cli("import", hf, "--out", out)
    message = " ".join(again.stderr.split())
    assert again.code == 1 and "is an imported model whose spec.yaml you edited" in message, message
    assert "dropout: 0.2" in spec.read_text()
    generated = run_cli("generate", out, "I want", "--max-new", "2")
    message = " ".join(generated.stderr.split())
    assert generated.code == 0 and "was edited after the import" in message and "blockgraph train" in message


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("spec", ["tiny_encoder.yaml", "transformer.yaml"])
def test_at_80_columns_the_tree_breaks_between_fields_never_inside_one(run_cli, spec):
    shown = run_cli("inspect", ROOT / "specs" / spec, env={"COLUMNS": "80"})
    assert shown.code == 0, shown.stderr
    tree = _lines(shown.stdout.split("\ntotal ")[0])
    assert len(tree) > 10 and all(len(line) <= 80 for line in tree)
    for line in tree:
        content = line.lstrip("│├└─ ")
        assert not content.startswith("FLOPs"), line  # `0 FLOPs` split over two lines
        assert line.count("[") == line.count("]"), line  # a shape split over two lines


def test_at_80_columns_the_table_keeps_shapes_whole_and_totals_with_their_numbers(run_cli):
    shown = run_cli("inspect", ROOT / "specs" / "transformer.yaml", "--format", "table", env={"COLUMNS": "80"})
    assert shown.code == 0, shown.stderr
    parts = shown.stdout.split("\n\n")
    table = [part for part in parts if "┃ node" in part]
    assert len(table) >= 2, shown.stdout
    for part in table:
        rows = [line for line in _lines(part) if line.startswith("│")]
        assert all(row.count("[") == row.count("]") for row in rows), part
        totals = [row for row in rows if row.startswith("│ total ")]
        cells = [cell.strip() for total in totals for cell in total.strip("│").split("│")[1:]]
        assert all(cells), f"a total row with nothing in it:\n{part}"
    assert sum("│ total " in part for part in table) == 1


def test_at_80_columns_block_summaries_get_room_to_read(run_cli):
    shown = run_cli("blocks", "list", env={"COLUMNS": "80"})
    assert shown.code == 0, shown.stderr
    header = next(line for line in shown.stdout.splitlines() if "summary" in line)
    assert len(header.split("┃")[-2]) >= 40, header


def test_validate_compiles_nothing_so_loads_no_compiler():
    """`validate` builds every block on `meta` to check it; nothing of that may pull in torch._dynamo (a second of
    start-up): a table computed on meta goes through decompositions that import it."""
    import subprocess
    import sys

    specs = sorted(str(path) for path in (ROOT / "specs").glob("*.yaml"))
    code = (
        "import sys; from blockgraph import cli\n"
        f"sys.argv = ['blockgraph', 'validate', *{specs!r}]\n"
        "try:\n    cli.main()\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('exit', code, 'dynamo', 'torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines()[-1] == "exit 0 dynamo False", done.stdout + done.stderr


def test_warm_up_longer_than_the_run_is_warned_about(tmp_path, run_cli):
    lines = tmp_path / "lines.txt"
    lines.write_text("a b c\nb c d\nc d e\n")
    spec = ROOT / "specs" / "tiny_encoder.yaml"
    common = ("train", spec, "--data", lines, "--valid-fraction", "0", "--set", "layers=1")
    short = run_cli(*common, "--max-steps", "3", "--out", tmp_path / "short")
    message = " ".join(short.stderr.split())
    assert short.code == 0 and "--warmup 4000 outlasts the run (3 steps)" in message, short.stderr
    fitting = run_cli(*common, "--max-steps", "3", "--warmup", "2", "--out", tmp_path / "fitting")
    assert fitting.code == 0 and "outlasts" not in fitting.stderr, fitting.stderr


def test_a_block_without_its_own_shape_rule_is_shown_with_the_default_rule(tmp_path, run_cli):
    plugin = tmp_path / "same_shape.py"
    plugin.write_text(
        "from blockgraph.blocks import Block, register\n\n"
        "@register('same_shape', family='demo')\n"
        "class SameShape(Block):\n    '''Returns its input.'''\n\n"
        "    def forward(self, x):\n        return x\n"
    )
    shown = run_cli("--plugin", plugin, "blocks", "show", "same_shape")
    message = " ".join(shown.stdout.split())
    assert shown.code == 0 and "shape rule: output has the shape of the first input" in message, shown.stdout

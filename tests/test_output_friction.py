"""What `inspect` and `blocks` print, where users stumbled (issue 17): block patterns, state_dict keys, decoder-only
layers, 80 columns and pipes, help metavars, the totals' wording, and legible default drawings."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from conftest import SPECS, assert_well_formed_dot
from rich.cells import cell_len
from rich.console import Console
from torch import nn

from blockgraph.blocks import REGISTRY, Block, BlockParams, register
from blockgraph.blocks.layers import DecoderLayer
from blockgraph.blocks.types import ShapeError, TensorType
from blockgraph.builder import pipeline, views
from blockgraph.builder.analysis import analyse

TINY = SPECS / "tiny_encoder.yaml"
TRANSFORMER = SPECS / "transformer.yaml"
GPT = SPECS / "gpt_decoder.yaml"
BOX = "│┃┏┓┗┛┡┩┣┫━─┼╇╋┳┻┯┷├┤└┘┌┐╭╮╰╯"


def _tokens(text: str) -> set[str]:
    """The words of a terminal rendering, table borders removed."""
    return set(re.sub(f"[{BOX}]", " ", text).split())


def _lines(text: str) -> set[str]:
    """Each line of a terminal rendering, table borders removed and spaces squeezed."""
    return {" ".join(re.sub(f"[{BOX}]", " ", line).split()) for line in text.splitlines()}


# --- 5: blocks list PATTERN -------------------------------------------------------------------------------------


def test_a_bare_word_matches_names_and_families(run_cli):
    listed = run_cli("blocks", "list", "attention")
    assert listed.code == 0, listed.stderr
    assert {"multi_head_attention", "global_attention", "scaled_dot_product_attention"} <= _tokens(listed.stdout)
    family = {e.name for e in REGISTRY.list("recurrent")}
    assert {"lstm", "gru", "rnn"} <= family  # no name holds "recurrent": their family does
    assert [e.name for e in REGISTRY.list("LSTM")] == ["lstm"]
    assert {e.name for e in REGISTRY.list("*_attention")} >= {"global_attention", "local_attention"}


def test_a_pattern_matching_nothing_says_so_and_how_patterns_match(run_cli):
    result = run_cli("blocks", "list", "xyz")
    assert result.code == 1 and result.exception is None
    message = " ".join(result.stderr.split())
    assert "no block matches 'xyz'" in message and "'*attn*'" in message and "Traceback" not in message
    gpt = " ".join(run_cli("blocks", "list", "gpt").stderr.split())
    assert "no block matches 'gpt'" in gpt and "decoder_layer" in gpt  # its documentation mentions GPT


# --- 9: state_dict keys -----------------------------------------------------------------------------------------


def test_inspect_params_lists_every_key_with_shape_and_count(run_cli):
    shown = run_cli("inspect", TINY, "--params")
    assert shown.code == 0, shown.stderr
    lines = _lines(shown.stdout)
    assert "encoder.0.attn.w_q.weight [64, 64] 4,096 parameter" in lines
    assert "position.pe [1, 5000, 64] 320,000 buffer, not saved" in lines
    data = json.loads(run_cli("inspect", TINY, "--params", "--format", "json").stdout)
    typed = pipeline.typed_graph(TINY)
    model = pipeline.compile_graph(typed, device="meta")
    assert data["format"] == "blockgraph.params/1"
    assert [k["name"] for k in data["keys"] if k["kind"] != "buffer, not saved"] == list(model.state_dict())
    assert sum(k["count"] for k in data["keys"] if k["kind"] == "parameter") == sum(
        p.numel() for p in model.parameters()
    )
    refused = run_cli("inspect", TINY, "--params", "--format", "dot")
    assert refused.code == 1 and "--params" in refused.stderr and refused.exception is None
    both = run_cli("inspect", TINY, "--params", "--code")
    assert both.code == 1 and "give one of them" in both.stderr and both.exception is None


def test_inspect_params_serves_a_spec_whose_tie_names_no_key(run_cli, write_spec):
    spec = write_spec(
        {
            "name": "lm",
            "inputs": {"tokens": {"dtype": "int64", "shape": ["batch", "seq"], "high": 50}},
            "nodes": {
                "embed": {"type": "token_embedding", "params": {"vocab": 50, "dim": 8}, "in": "tokens"},
                "gen": {"type": "generator", "params": {"d_model": 8, "vocab": 50}, "in": "embed"},
            },
            "tie": {"gen.proj.weight": "embed.weight"},
            "outputs": "gen",
        }
    )
    assert run_cli("inspect", spec).code == 1  # the tie itself fails
    shown = run_cli("inspect", spec, "--params")
    assert shown.code == 0, shown.stderr
    text = " ".join(re.sub(f"[{BOX}]", " ", shown.stdout).split())
    assert "embed.lut.weight [50, 8]" in text and "embed.weight is no parameter (did you mean embed.lut.weight" in text


def test_blocks_show_lists_the_blocks_keys_with_example_shapes(run_cli):
    shown = run_cli("blocks", "show", "decoder_layer")
    assert shown.code == 0, shown.stderr
    assert {"self_attn.w_q.weight [512, 512] parameter", "norm3.bias [512] parameter"} <= _lines(shown.stdout)
    table = run_cli("blocks", "show", "sinusoidal_position").stdout
    assert "pe [1, 5000, 512] buffer, not saved" in _lines(table)


# --- 10: a decoder-only layer -----------------------------------------------------------------------------------


@pytest.fixture
def no_fastpath():
    """torch's plain Python path, not its fused inference kernels."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def test_decoder_layer_without_cross_attention_is_a_causal_encoder_layer(no_fastpath):
    """decoder_layer with `cross_attention: false` against nn.TransformerEncoderLayer given a causal mask."""
    d, heads, d_ff = 8, 2, 16
    for norm_first in (False, True):
        ours = DecoderLayer(
            DecoderLayer.Params(d_model=d, heads=heads, d_ff=d_ff, cross_attention=False, norm_first=norm_first)
        )
        with torch.no_grad():
            for p in ours.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        ours.eval()
        state = ours.state_dict()
        ref = nn.TransformerEncoderLayer(d, heads, d_ff, dropout=0.0, batch_first=True, norm_first=norm_first)
        ref.load_state_dict(
            {
                "self_attn.in_proj_weight": torch.cat([state[f"self_attn.w_{n}.weight"] for n in "qkv"]),
                "self_attn.in_proj_bias": torch.cat([state[f"self_attn.w_{n}.bias"] for n in "qkv"]),
                "self_attn.out_proj.weight": state["self_attn.w_o.weight"],
                "self_attn.out_proj.bias": state["self_attn.w_o.bias"],
                "linear1.weight": state["ffn.w_1.weight"],
                "linear1.bias": state["ffn.w_1.bias"],
                "linear2.weight": state["ffn.w_2.weight"],
                "linear2.bias": state["ffn.w_2.bias"],
            }
            | {k: v for k, v in state.items() if k.startswith("norm")}
        )
        ref.eval()
        x = torch.randn(2, 5, d)
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x, src_mask=causal), rtol=1e-5, atol=1e-5)


def test_the_connect_memory_error_points_to_the_decoder_only_layer():
    params = DecoderLayer.Params(d_model=8, heads=2, d_ff=16)
    with pytest.raises(ShapeError) as raised:
        DecoderLayer.infer(params, TensorType(("batch", "seq", 8)))
    assert "connect `memory`" in str(raised.value) and "cross_attention: false" in raised.value.hint
    assert "decoder-only (GPT)" in REGISTRY.get("decoder_layer").summary  # what `blocks list layer` shows


# --- 15: 80 columns, pipes, help --------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "depth"), [(TINY, None), (TINY, "1"), (TRANSFORMER, None)])
def test_the_table_breaks_no_word_at_80_columns(run_cli, spec, depth):
    args = ["inspect", spec, "--format", "table", *(["--depth", depth] if depth else [])]
    narrow = run_cli(*args, env={"COLUMNS": "80"})
    assert narrow.code == 0, narrow.stderr
    assert max(map(cell_len, narrow.stdout.splitlines())) <= 80
    typed = pipeline.typed_graph(spec)
    model = pipeline.compile_graph(typed, device="meta")
    table = views.architecture_table(
        typed, views.node_params(model), int(depth) if depth else None, analyse(typed, model)
    )
    words = _tokens(narrow.stdout)
    for column in table.columns:
        assert column.header in words
        for cell in column.cells:
            assert set(str(cell).split()) <= words, (column.header, str(cell))


def test_blocks_list_cuts_no_name_at_80_columns(run_cli):
    listed = run_cli("blocks", "list", env={"COLUMNS": "80"})
    assert listed.code == 0 and max(map(cell_len, listed.stdout.splitlines())) <= 80
    assert {e.name for e in REGISTRY.list()} <= _tokens(listed.stdout)


def test_flags_have_no_metavar_and_values_upper_case_ones(run_cli):
    rows = {}
    for command in (["inspect"], ["blocks", "list"], ["blocks", "show"]):
        text = run_cli(*command, "--help", env={"COLUMNS": "160"}).stdout
        for line in text.splitlines():
            found = re.match(r"^│\s*(?:\*\s+)?(--[a-z-]+|[a-z]+)\s+(?:-[a-z]\s+)?(\S+)", line)
            if found:
                rows[found.group(1)] = found.group(2)
    assert (rows["--code"], rows["--params"], rows["--allow-external-files"]) == ("Print", "List", "Let")  # no <bool>
    assert rows["--depth"] == "N" and rows["--dtype"] == "TEXT"
    assert rows["--format"] == "[tree|table|json|mermaid|dot|html|svg|png]"
    assert rows["spec"] == "PATH" and rows["pattern"] == rows["name"] == "TEXT"


# --- 16: the totals -----------------------------------------------------------------------------------------------


def _totals(spec: dict | str) -> str:
    """The tree and totals `inspect` prints, wide, spaces squeezed."""
    typed = pipeline.typed_graph(spec)
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(views.inspect_report(typed, pipeline.compile_graph(typed, device="meta")))
    return " ".join(console.file.getvalue().split())


ONE = {
    "name": "one",
    "inputs": {"x": {"shape": ["batch", 4]}},
    "dims": {"batch": 2},
    "nodes": {"lin": {"type": "linear", "params": {"in_features": 4, "out_features": 3}, "in": "x"}},
    "outputs": "lin",
}


def test_totals_say_what_they_include_and_count_in_the_singular():
    one = _totals(ONE)
    assert "15 parameters (15), 15 trainable, 1 block " in one + " "
    assert "weights parameters float32 60 B" in one and "no buffers" in one
    assert "training ≈" in one and "= parameters 60 B + gradients" in one
    tiny = _totals(str(TINY))
    assert re.search(r"; buffers [\d.]+ [KM]iB more \(float32\)", tiny)
    assert re.search(r"= parameters [\d.]+ KiB \+ buffers [\d.]+ MiB \+ gradients", tiny)


def test_a_block_without_a_formula_that_counts_no_flops_adds_zero(restored_registry):
    @register("doubled", family="test")
    class Doubled(Block):
        """y = 2x: element-wise, no formula of its own."""

        class Params(BlockParams):
            pass

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    @register("squared_rows", family="test")
    class SquaredRows(Block):
        """y = x xᵀ x: matrix products, no formula of its own."""

        class Params(BlockParams):
            pass

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ x.transpose(-1, -2) @ x

    spec = ONE | {"nodes": ONE["nodes"] | {"twice": {"type": "doubled", "in": "lin"}}, "outputs": "twice"}
    typed = pipeline.typed_graph(spec)
    costs = analyse(typed, pipeline.compile_graph(typed, device="meta"))
    assert costs.nodes["twice"].flops_analytic is None and costs.flops_analytic == costs.flops == 2 * 2 * 4 * 3
    text = _totals(spec)
    assert "the analytic formulas agree" in text and "no formula" not in text
    spec["nodes"]["twice"]["type"] = "squared_rows"
    assert "no formula for squared_rows" in _totals(spec)


def test_the_trees_first_line_gives_the_formulas_flops_without_sizes(write_spec):
    spec = {
        "name": "lstm-lm",
        "inputs": {
            "tokens": {"dtype": "int64", "shape": ["batch", "seq"], "high": 20},
            "pad": {"dtype": "bool", "shape": ["batch", "seq"], "optional": True},
        },
        "nodes": {
            "embed": {"type": "token_embedding", "params": {"vocab": 20, "dim": 8}, "in": "tokens"},
            "lstm": {
                "type": "lstm",
                "params": {"input_size": 8, "hidden_size": 8},
                "in": {"x": "embed", "mask": "pad"},
            },
            "gen": {"type": "generator", "params": {"d_model": 8, "vocab": 20}, "in": "lstm.y"},
        },
        "outputs": "gen",
    }
    first = _totals(spec).split("├")[0]
    typed = pipeline.typed_graph(spec)
    expression = analyse(typed, pipeline.compile_graph(typed, device="meta")).flops_analytic
    assert f"{expression} FLOPs" in first and "batch*seq" in first


# --- 18: drawings -------------------------------------------------------------------------------------------------


def test_drawings_draw_each_repeat_once_by_default(run_cli):
    dot = run_cli("inspect", TRANSFORMER, "--format", "dot").stdout
    assert "encoder_layer ×6" in dot and "decoder_layer ×6" in dot and '"encoder.1"' not in dot
    assert '"encoder.0" -> "encoder_norm"' in dot and '"encoder_norm" -> "decoder.0" [label="memory"]' in dot
    boxes = re.findall(r'^\s*"[^"]+" \[label=', dot, re.M)
    assert len(boxes) == 9  # the 9 top-level nodes, not 7 + 6 + 6 layers
    fonts = set(re.findall(r"fontname=(\"[^\"]+\")", dot))
    assert len(fonts) == 1 and re.search(r"^\s*graph \[fontname=", dot, re.M)  # clusters too, not Times
    gpt = run_cli("inspect", GPT, "--format", "mermaid").stdout
    assert "gpt_block ×12 (one copy drawn)" in gpt and "decoder.0.attn" in gpt and "decoder.1." not in gpt
    every = run_cli("inspect", TRANSFORMER, "--format", "dot", "--depth", "9").stdout
    assert '"encoder.5"' in every  # --depth draws every copy


def test_default_drawings_are_well_formed_graphviz():
    pytest.importorskip("pydot")
    for spec in (TRANSFORMER, GPT, TINY):
        typed = pipeline.typed_graph(spec)
        assert_well_formed_dot(views.inspect_report(typed, pipeline.compile_graph(typed, device="meta"), fmt="dot"))

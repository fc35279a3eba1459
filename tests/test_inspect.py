"""`inspect` without allocating: FLOPs (torch's count vs the analytic formulas), memory, collapsed views, JSON,
Mermaid and Graphviz output, and GPT-3 175B on the meta device."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess

import pytest
import sympy
import torch
import yaml
from conftest import SPECS, assert_well_formed_dot
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from blockgraph import builder, cli
from blockgraph.blocks import REGISTRY, Block, BlockParams, TensorType, register
from blockgraph.blocks.types import symbol
from blockgraph.builder import pipeline, trial, views
from blockgraph.builder.analysis import analyse
from blockgraph.builder.graph import Graph

TINY = SPECS / "tiny_encoder.yaml"
GPT3 = SPECS / "gpt3_175b.yaml"
DIMS = {"batch": 2, "seq": 5, "src": 7}

# One node per block and variant whose FLOPs both ways must agree (batch 2, seq 5, src 7).
EVERY_BLOCK = {
    "name": 'every "block"',
    "inputs": {
        "x": {"shape": ["batch", "seq", 8]},
        "m": {"shape": ["batch", "src", 8]},
        "pad": {"dtype": "bool", "shape": ["batch", "seq"], "optional": True},
        "tok": {"dtype": "int64", "shape": ["batch", "seq"], "high": 10},
    },
    "nodes": {
        "emb": {"type": "token_embedding", "params": {"vocab": 10, "dim": 8, "freeze": True}, "in": "tok"},
        "pos": {"type": "learned_position", "params": {"dim": 8, "max_len": 16}, "in": "emb"},
        "lin": {"type": "linear", "params": {"in_features": 8, "out_features": 12}, "in": "x"},
        "ffn": {"type": "feed_forward", "params": {"d_model": 8, "d_ff": 16, "activation": "gelu"}, "in": "x"},
        "swi": {"type": "swiglu", "params": {"d_model": 8, "d_ff": 12}, "in": "x"},
        "swi2": {"type": "swiglu", "share": "swi", "in": "swi"},
        "moe": {
            "type": "mixture_of_experts",
            "params": {"d_model": 8, "d_ff": 6, "experts": 4, "top_k": 2, "shared_d_ff": 4, "shared_gate": True},
            "in": {"x": "x", "pad": "pad"},
        },
        "gen": {"type": "generator", "params": {"d_model": 8, "vocab": 11}, "in": "pos"},
        "self": {"type": "multi_head_attention", "params": {"d_model": 8, "heads": 2, "causal": True}, "in": "x"},
        "masked": {
            "type": "multi_head_attention",
            "params": {"d_model": 8, "heads": 2},
            "in": {"query": "x", "key_padding_mask": "pad"},
        },
        "cross": {
            "type": "multi_head_attention",
            "params": {"d_model": 8, "heads": 2, "need_weights": True},
            "in": {"query": "x", "key": "m"},
        },
        "sdpa": {"type": "scaled_dot_product_attention", "params": {"causal": True}, "in": ["x", "m", "m"]},
        "enc": {"type": "encoder_layer", "params": {"d_model": 8, "heads": 2, "d_ff": 16}, "in": "x"},
        "enc_pre": {
            "type": "encoder_layer",
            "params": {"d_model": 8, "heads": 2, "d_ff": 16, "norm_first": True},
            "in": "enc",
        },
        "dec": {"type": "decoder_layer", "params": {"d_model": 8, "heads": 2, "d_ff": 16}, "in": ["enc_pre", "m"]},
        "glob": {
            "type": "global_attention",
            "params": {"d_query": 8, "d_memory": 8, "score": "concat", "d_attn": 5},
            "in": ["x", "m"],
        },
        "general": {"type": "global_attention", "params": {"d_query": 8, "d_memory": 8}, "in": ["x", "m"]},
        "additive": {
            "type": "local_attention",
            "params": {"d_query": 8, "d_memory": 8, "score": "additive", "window": 2},
            "in": ["x", "m"],
        },
        "monotonic": {
            "type": "local_attention",
            "params": {"d_query": 8, "d_memory": 8, "score": "dot", "window": 2, "mode": "monotonic"},
            "in": ["x", "m"],
        },
        "hard": {"type": "hard_attention", "params": {"d_query": 8, "d_memory": 8, "score": "dot"}, "in": ["x", "m"]},
        "rnn": {"type": "rnn", "params": {"input_size": 8, "hidden_size": 4}, "in": "pos"},
        "lstm": {
            "type": "lstm",
            "params": {"input_size": 8, "hidden_size": 6, "layers": 2, "bidirectional": True},
            "in": "x",
        },
        "fused": {
            "type": "lstm",
            "params": {
                "input_size": 8,
                "hidden_size": 6,
                "layers": 2,
                "bidirectional": True,
                "implementation": "fused",
            },
            "in": "x",
        },
        "gru": {"type": "gru", "params": {"input_size": 12, "hidden_size": 5}, "in": "lstm.y"},
        "ln": {"type": "layer_norm", "params": {"dim": 8}, "in": "dec"},
        "rms": {"type": "rms_norm", "params": {"dim": 8}, "in": "ln"},
        "bn": {"type": "batch_norm", "params": {"dim": 8}, "in": "rms"},
        "drop": {"type": "dropout", "params": {"p": 0.1}, "in": "bn"},
        "res": {"type": "add", "in": ["drop", "x"]},
        "addnorm": {"type": "add_norm", "params": {"dim": 8}, "in": ["res", "self"]},
    },
    "outputs": {
        name: ref
        for name, ref in {
            "gen": "gen",
            "lin": "lin",
            "ffn": "ffn",
            "swi2": "swi2",
            "moe": "moe.y",
            "masked": "masked",
            "weights": "cross.weights",
            "sdpa": "sdpa.y",
            "glob": "glob.context",
            "general": "general.context",
            "additive": "additive.weights",
            "monotonic": "monotonic.context",
            "hard": "hard.context",
            "rnn": "rnn.y",
            "fused": "fused.h",
            "gru": "gru.y",
            "addnorm": "addnorm",
        }.items()
    },
}
MATMUL_FREE = {
    "token_embedding",
    "learned_position",
    "layer_norm",
    "rms_norm",
    "batch_norm",
    "dropout",
    "add",
    "add_norm",
}


@pytest.fixture(scope="module")
def every_block():
    typed = pipeline.typed_graph(EVERY_BLOCK)
    model = pipeline.compile_graph(typed, device="meta")
    return typed, model, analyse(typed, model, DIMS)


@pytest.fixture(scope="module")
def tiny():
    typed = pipeline.typed_graph(TINY)
    return typed, pipeline.compile_graph(typed, device="meta")


@pytest.fixture(scope="module")
def gpt3():
    model = builder.build(GPT3, device="meta")
    return model.typed_graph, model


# --- FLOPs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node", list(EVERY_BLOCK["nodes"]))
def test_torch_and_analytic_flops_agree_per_block(every_block, node):
    _, _, costs = every_block
    cost = costs.nodes[node]
    assert cost.error is None
    assert cost.flops == cost.flops_analytic
    assert (cost.flops == 0) == (cost.block in MATMUL_FREE)


def test_per_node_flops_add_up_to_torchs_whole_model_count(tiny):
    typed, model = tiny
    costs = analyse(typed, model, {"batch": 3, "seq": 7})
    total, per_module = whole_model_flops(model, meta_inputs(typed.graph, costs.dims))
    assert costs.flops == total == sum(n.flops for n in costs.nodes.values())
    prefix = type(model).__name__
    for node_id, cost in costs.nodes.items():
        assert per_module.get(f"{prefix}.{node_id}", 0) == cost.flops


def test_analytic_flops_are_expressions_of_the_dimensions_without_sizes(write_spec):
    spec = yaml.safe_load(TINY.read_text())
    del spec["dims"]
    typed = pipeline.typed_graph(spec)
    model = pipeline.compile_graph(typed, device="meta")
    symbolic = analyse(typed, model)
    assert not symbolic.concrete and symbolic.flops is None and symbolic.missing_dims == ("batch", "seq")
    expression = symbolic.flops_analytic
    assert isinstance(expression, sympy.Expr) and symbol("batch") in expression.free_symbols
    concrete = analyse(typed, model, {"batch": 3, "seq": 7})
    assert expression.subs({symbol("batch"): 3, symbol("seq"): 7}) == concrete.flops == concrete.flops_analytic
    text = _text(views.inspect_totals(typed, symbolic))
    assert "need sizes for batch, seq" in text and "--dim batch=N" in text


def test_a_blocks_own_flops_hook_wins(write_spec):
    @register("scaled_copy", family="test")
    class ScaledCopy(Block):
        """Multiply by two; claims 3 FLOPs per element."""

        class Params(BlockParams):
            pass

        @classmethod
        def flops(cls, params, inputs, outputs):
            return 3 * math.prod(outputs[0].shape)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    try:
        spec = {
            "name": "h",
            "inputs": {"x": {"shape": ["batch", 4]}},
            "nodes": {"s": {"type": "scaled_copy", "in": "x"}},
        }
        spec["outputs"] = "s"
        typed = pipeline.typed_graph(spec)
        costs = analyse(typed, pipeline.compile_graph(typed, device="meta"), {"batch": 5})
        assert costs.nodes["s"].flops_analytic == 3 * 5 * 4 and costs.nodes["s"].flops == 0
    finally:
        REGISTRY.remove("scaled_copy")


class _ReadsValues(Block):
    """A block whose forward needs real values (`.item()`), which meta tensors do not have."""

    @classmethod
    def infer(cls, p: object, x: TensorType) -> TensorType:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.abs().max().item())


def test_a_node_torch_cannot_run_on_meta_is_reported_not_fatal():
    spec = {
        "name": "values",
        "inputs": {"x": {"shape": ["batch", "seq", 4]}},
        "nodes": {
            "scale": {"type": "reads_values", "in": "x"},
            "proj": {"type": "linear", "params": {"in_features": 4, "out_features": 3}, "in": "scale"},
        },
        "outputs": "proj",
    }
    REGISTRY.add("reads_values", _ReadsValues, family="test")
    try:
        typed = pipeline.typed_graph(spec)
        costs = analyse(typed, pipeline.compile_graph(typed, device="meta"), {"batch": 2, "seq": 3})
    finally:
        REGISTRY.remove("reads_values")
    node = costs.nodes["scale"]
    assert node.error and node.flops is None and costs.flops is None
    assert costs.nodes["proj"].flops == 2 * 2 * 3 * 4 * 3
    assert costs.saved_activation_bytes >= node.activation_bytes  # counted by its outputs
    assert "could not run 1 node(s) on meta" in _text(views.inspect_totals(typed, costs))


# --- memory -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_memory_is_numel_times_element_size(every_block, dtype):
    typed, model, _ = every_block
    costs = analyse(typed, model, DIMS, dtype=dtype, measure=False)
    for inst in typed.graph.nodes.values():
        expected = 0
        for t in typed.output_types(inst):
            size = trial.concrete_shape(t, DIMS)
            kind = dtype if t.dtype.is_floating_point else t.dtype
            expected += math.prod(size) * torch.empty((), dtype=kind).element_size()
        assert costs.nodes[inst.id].activation_bytes == expected, inst.id
    assert costs.activation_bytes == sum(n.activation_bytes for n in costs.nodes.values())


def test_training_memory_is_weights_gradients_adam_and_saved_activations(every_block):
    typed, model, costs = every_block
    parts = costs.training_bytes()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert parts["weights"] == costs.parameters * 4 + buffers
    assert parts["gradients"] == costs.trainable * 4 < costs.parameters * 4  # the frozen embedding has none
    assert parts["optimizer"] == costs.trainable * 8 and parts["master_weights"] == 0
    assert parts["activations"] == costs.saved_activation_bytes > 0
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    half = analyse(typed, model, DIMS, dtype=torch.bfloat16).training_bytes()
    assert half["master_weights"] == costs.trainable * 4 and half["gradients"] == costs.trainable * 2
    assert costs.weight_bytes() == {
        n: costs.parameters * s for n, s in {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}.items()
    }


def test_shared_modules_count_parameters_once_and_flops_per_call(every_block):
    _, _, costs = every_block
    assert costs.nodes["swi2"].params == 0 and costs.nodes["swi2"].flops == costs.nodes["swi"].flops > 0


# --- totals, collapsing, JSON -----------------------------------------------------------------------------------


def _text(renderable) -> str:
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def _column(table, name: str) -> list[str]:
    column = next(c for c in table.columns if c.header == name)
    return [str(cell) for cell in column.cells]


@pytest.mark.parametrize("depth", [None, 1, 2])
def test_table_totals_are_the_sums_of_its_rows(tiny, depth):
    typed, model = tiny
    params = views.node_params(model)
    costs = analyse(typed, model)
    table = views.architecture_table(typed, params, depth, costs)
    rows = _column(table, "params")[:-1]
    assert sum(int(r.replace(",", "")) for r in rows) == costs.parameters == sum(params.values())
    assert _column(table, "params")[-1] == f"{costs.parameters:,}"
    assert _column(table, "FLOPs")[-1] == views.flops_text(costs.flops)
    assert _column(table, "activations")[-1] == views.bytes_text(costs.activation_bytes)


def test_collapsed_tree_and_table_show_groups_with_summed_numbers(tiny):
    typed, model = tiny
    params = views.node_params(model)
    costs = analyse(typed, model)
    encoder = [n for n in costs.nodes.values() if n.id.startswith("encoder.")]
    summed = sum(n.params for n in encoder)
    table = views.architecture_table(typed, params, 1, costs)
    nodes, blocks = _column(table, "node"), _column(table, "block")
    row = nodes.index("encoder")
    assert blocks[row] == "encoder_block ×2" and "encoder.0.attn" not in nodes
    assert _column(table, "params")[row] == f"{summed:,}"
    assert _column(table, "FLOPs")[row] == views.flops_text(sum(n.flops for n in encoder))
    assert nodes == ["embed", "position", "encoder", "generator", "total"]
    two = _column(views.architecture_table(typed, params, 2, costs), "node")
    assert "encoder.0" in two and "encoder.1" in two and "encoder.0.ffn" not in two
    tree = _text(views.architecture_tree(typed, params, 1, costs))
    assert "encoder_block ×2" in tree and f"{summed:,}" in tree and "norm1" not in tree
    assert "[batch, seq, 64], [batch, seq] → [batch, seq, 64]" in tree  # a group's own inputs and outputs
    assert "norm1" in _text(views.architecture_tree(typed, params, None, costs))


NODE_KEYS = {
    "id", "block", "source", "params", "inputs", "outputs", "parameters", "trainable_parameters", "module", "group",
    "flops", "flops_by_op", "flops_analytic", "activation_bytes", "saved_bytes", "error", "flops_error",
    "active_parameters",
}  # fmt: skip
TOP_KEYS = {
    "format", "name", "inputs", "dims", "missing_dims", "dtype", "nodes", "groups", "outputs", "total_parameters",
    "totals",
}  # fmt: skip
TOTAL_KEYS = {
    "parameters", "trainable_parameters", "flops", "flops_analytic", "activation_bytes", "saved_activation_bytes",
    "buffer_bytes", "weight_bytes", "training_bytes", "active_parameters", "flops_per_token",
}  # fmt: skip
GROUP_KEYS = {
    "id", "kind", "type", "count", "nodes", "parameters", "trainable_parameters", "flops", "flops_analytic",
    "activation_bytes",
}  # fmt: skip


@pytest.mark.parametrize("sized", [True, False], ids=["dims", "symbolic"])
def test_json_keys_are_stable(tiny, sized):
    typed, model = tiny
    spec = yaml.safe_load(TINY.read_text())
    if not sized:
        del spec["dims"]
        typed = pipeline.typed_graph(spec)
        model = pipeline.compile_graph(typed, device="meta")
    data = json.loads(views.inspect_report(typed, model, fmt="json"))
    assert data["format"] == "blockgraph.inspect/1"
    assert set(data) == TOP_KEYS and set(data["totals"]) == TOTAL_KEYS
    assert all(set(node) == NODE_KEYS for node in data["nodes"])
    assert all(set(group) == GROUP_KEYS for group in data["groups"])
    assert all(set(i) == {"shape", "dtype", "optional", "concrete_shape"} for i in data["inputs"].values())
    port = data["nodes"][0]["outputs"]["y"]
    assert set(port) == {"shape", "dtype", "concrete_shape"} and port["shape"] == ["batch", "seq", "64"]
    assert data["total_parameters"] == data["totals"]["parameters"] == sum(n["parameters"] for n in data["nodes"])
    encoder = next(g for g in data["groups"] if g["id"] == "encoder")
    assert encoder == encoder | {"kind": "repeat", "type": "encoder_block", "count": 2, "nodes": 8}
    if sized:
        assert data["dims"] == {"batch": 2, "seq": 16} and port["concrete_shape"] == [2, 16, 64]
        assert data["totals"]["flops"] == sum(n["flops"] for n in data["nodes"]) == data["totals"]["flops_analytic"]
        assert data["totals"]["activation_bytes"] == sum(n["activation_bytes"] for n in data["nodes"])
        assert encoder["flops"] == sum(n["flops"] for n in data["nodes"] if n["id"].startswith("encoder."))
    else:
        assert data["dims"] is None and data["missing_dims"] == ["batch", "seq"] and port["concrete_shape"] is None
        assert data["totals"]["flops"] is None and "batch" in data["totals"]["flops_analytic"]


# --- Mermaid and Graphviz ---------------------------------------------------------------------------------------

MERMAID_ID = r"[A-Za-z][A-Za-z0-9_]*"
MERMAID_LABEL = r'"[^"]*"'
MERMAID_NODE = re.compile(rf"^({MERMAID_ID})(\[/{MERMAID_LABEL}/\]|\[{MERMAID_LABEL}\]|\(\[{MERMAID_LABEL}\]\))$")
MERMAID_EDGE = re.compile(rf"^({MERMAID_ID}) -->(?:\|{MERMAID_LABEL}\|)? ({MERMAID_ID})$")
MERMAID_SUBGRAPH = re.compile(rf"^subgraph ({MERMAID_ID}) \[{MERMAID_LABEL}\]$")


def check_mermaid(text: str) -> tuple[set[str], list[tuple[str, str]]]:
    """A structural check of what `architecture_mermaid` writes: a `flowchart TD`, safe ids declared once,
    quoted labels with no raw quotes or markup (only <br/>), balanced subgraphs, edges between declared nodes."""
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    declared: set[str] = set()
    edges = []
    depth = 0
    for line in (raw.strip() for raw in lines[1:]):
        if not line or line.startswith("%%"):
            continue
        for label in re.findall(MERMAID_LABEL, line):
            assert "<" not in label.replace("<br/>", "") and ">" not in label.replace("<br/>", ""), label
        if line == "end":
            depth -= 1
            assert depth >= 0, "end without subgraph"
        elif match := MERMAID_SUBGRAPH.match(line):
            assert match[1] not in declared
            declared.add(match[1])
            depth += 1
        elif match := MERMAID_NODE.match(line):
            assert match[1] not in declared and match[1].lower() != "end", match[1]
            declared.add(match[1])
        elif match := MERMAID_EDGE.match(line):
            edges.append((match[1], match[2]))
        else:
            raise AssertionError(f"not a Mermaid statement: {line!r}")
    assert depth == 0, "unclosed subgraph"
    for source, target in edges:
        assert source in declared and target in declared, (source, target)
    return declared, edges


@pytest.mark.parametrize("depth", [None, 1, 2])
def test_mermaid_is_well_formed(tiny, every_block, depth):
    for typed, model in (tiny, every_block[:2]):
        text = views.inspect_report(typed, model, fmt="mermaid", depth=depth)
        declared, edges = check_mermaid(text)
        assert len(edges) >= len(typed.graph.outputs)
    declared, edges = check_mermaid(views.inspect_report(*tiny, fmt="mermaid", depth=1))
    assert {"i_tokens", "i_pad", "n_encoder", "r_output"} <= declared
    assert '|"key_padding_mask"|' in views.inspect_report(*tiny, fmt="mermaid", depth=1)
    assert '["encoder<br/>encoder_block ×2<br/>[batch, seq, 64]' in views.inspect_report(*tiny, fmt="mermaid", depth=1)


def _dot_outputs(typed, model):
    return {depth: views.inspect_report(typed, model, fmt="dot", depth=depth) for depth in (None, 1, 2)}


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_dot_renders_with_graphviz(tiny, every_block):
    for typed, model in (tiny, every_block[:2]):
        for depth, text in _dot_outputs(typed, model).items():
            result = subprocess.run(["dot", "-Tsvg"], input=text, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and not result.stderr, (depth, result.stderr)
            assert "<svg" in result.stdout


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot's use of pyparsing
def test_dot_parses_with_pydot(tiny, every_block):
    pytest.importorskip("pydot")
    texts = [*_dot_outputs(*tiny).values(), views.inspect_report(*every_block[:2], fmt="dot")]
    for text in texts:
        graph = assert_well_formed_dot(text)
    assert graph.get_name() == '"every \\"block\\""'  # the spec's name, quotes escaped
    collapsed = views.inspect_report(*tiny, fmt="dot", depth=1)
    assert '"in:pad" -> "encoder" [label="key_padding_mask"];' in collapsed


# --- mixtures of experts: active and total parameters ----------------------------------------------------------


def test_mixtral_8x7b_shows_its_active_parameters_and_flops_per_token(run_cli):
    """46.7B parameters, of which a token reads 12.9B: its router, 2 of the 8 experts and everything else; the
    forward FLOPs per token are twice the multiplied ones (not the embedding's look-up, not the norms' gains),
    and attention's QKᵀ and AV (one position)."""
    result = run_cli("inspect", SPECS / "mixtral.yaml", "--dim", "batch=1", "--dim", "seq=1", "--format", "json")
    assert result.code == 0, result.stderr
    totals = json.loads(result.stdout)["totals"]
    d, d_ff, layers, vocab = 4096, 14336, 32, 32000
    idle = layers * (8 - 2) * 3 * d * d_ff  # the experts a token is not routed to
    assert totals["parameters"] == 46_702_792_704 and totals["active_parameters"] == 46_702_792_704 - idle
    assert round(totals["active_parameters"] / 1e9, 1) == 12.9
    multiplied = totals["active_parameters"] - vocab * d - (2 * layers + 1) * d
    assert totals["flops_per_token"] == totals["flops"] == 2 * multiplied + layers * 4 * d
    tree = run_cli("inspect", SPECS / "mixtral.yaml", "--depth", "1", env={"COLUMNS": "200"})
    assert "12,879,925,248 parameters per token (12.88B of 46.70B)" in tree.stdout


def test_a_dense_model_has_every_parameter_active(tiny):
    typed, model = tiny
    costs = analyse(typed, model)
    assert costs.active_parameters == costs.parameters and costs.tokens == 2 * 16
    assert "per token" not in _text(views.inspect_totals(typed, costs))


# --- GPT-3 175B -------------------------------------------------------------------------------------------------


def test_gpt3_parameter_count_matches_the_formula(gpt3):
    _, model = gpt3
    v = yaml.safe_load(GPT3.read_text())["vars"]
    layers, d, vocab, context = v["layers"], v["d_model"], v["vocab"], v["context"]
    d_ff = 4 * d
    per_layer = (
        2 * d  # ln_1
        + 4 * (d * d + d)  # W_Q, W_K, W_V, W_O with biases
        + 2 * d  # ln_2
        + (d * d_ff + d_ff)
        + (d_ff * d + d)  # the MLP
    )  # = 12·d² + 13·d
    assert per_layer == 12 * d**2 + 13 * d
    expected = vocab * d + context * d + layers * per_layer + 2 * d  # + the final LN; the head is tied, no bias
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.generator.proj.weight is model.embed.lut.weight
    assert 174e9 < expected < 176e9


def test_gpt3_inspects_on_meta_with_flops_from_both_sides(gpt3):
    typed, model = gpt3
    costs = analyse(typed, model)
    v = yaml.safe_load(GPT3.read_text())["vars"]
    batch, seq, d, layers = costs.dims["batch"], costs.dims["seq"], v["d_model"], v["layers"]
    matmul_weights = layers * 12 * d**2 + v["vocab"] * d  # per layer W_Q, W_K, W_V, W_O, W_1, W_2; the output layer
    attention = layers * 4 * batch * seq**2 * d  # QKᵀ and AV over all heads (the causal mask not halving it)
    assert costs.flops == costs.flops_analytic == 2 * batch * seq * matmul_weights + attention
    tree = _text(views.inspect_report(typed, model, depth=1))
    assert (
        "gpt_block ×96" in tree and f"{costs.parameters:,} parameters" in tree and "the analytic formulas agree" in tree
    )


# --- the command line (once cli.py routes inspect through views.inspect_report) --------------------------------

wired = pytest.mark.skipif(not hasattr(cli.InspectFormat, "mermaid"), reason="cli.py inspect not wired up yet")


@wired
def test_cli_inspect_formats_dims_and_depth(run_cli):
    table = run_cli("inspect", TINY, "--format", "table", "--depth", "1", "--dim", "batch=4")
    assert table.code == 0, table.stderr
    assert "encoder_block ×2" in table.stdout and "[4, 16, 64]" in table.stdout and "FLOPs" in table.stdout
    data = json.loads(run_cli("inspect", TINY, "--format", "json", "--dim", "seq=3").stdout)
    assert data["dims"] == {"batch": 2, "seq": 3}
    check_mermaid(run_cli("inspect", TINY, "--format", "mermaid", "--depth", "1").stdout)
    assert run_cli("inspect", TINY, "--format", "dot").stdout.startswith('digraph "tiny-encoder" {')
    half = run_cli("inspect", TINY, "--dtype", "bfloat16")
    assert half.code == 0 and "bfloat16" in half.stdout


# --- helpers: torch's count of a whole forward, to hold the per-node sum against ---------------------------------


def whole_model_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, dict[str, int]]:
    """torch's count for one forward of the whole model (meta inputs), total and per module name.

    The per-module breakdown is `FlopCounterMode`'s own, keyed `ClassName.path.to.module`. Slower than
    `analyse` on deep stacks (every layer runs); the tests use it to check `analyse`'s per-node sum.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module


def meta_inputs(graph: Graph, dims: dict[str, int], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Meta tensors for the required inputs at these sizes (floating inputs in `dtype` when given)."""
    tensors = {}
    for name, spec in graph.inputs.items():
        if spec.optional:
            continue
        shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        kind = spec.torch_dtype
        if dtype is not None and kind.is_floating_point:
            kind = dtype
        tensors[name] = torch.empty(shape, dtype=kind, device="meta")
    return tensors

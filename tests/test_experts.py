"""The mixture of experts (blocks/experts.py) against transformers' MoE modules of Mixtral, Qwen2-MoE, Qwen3-MoE and
DeepSeek-V3 (small configs, weights redrawn), its load-balancing loss against `load_balancing_loss_func`, its
routing (each expert on its own tokens only), and its behaviour on meta, in bfloat16 and with int8 weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import redraw
from pydantic import ValidationError
from transformers.models.mixtral import modeling_mixtral

from blockgraph.blocks.experts import MixtureOfExperts
from blockgraph.builder import precision

torch.set_num_threads(1)

D, FF = 16, 12


def _mixtral() -> tuple[torch.nn.Module, dict]:
    config = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=FF, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager"
    )
    return modeling_mixtral.MixtralSparseMoeBlock(config), {"experts": 4, "top_k": 2}


def _qwen2() -> tuple[torch.nn.Module, dict]:
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    config = transformers.Qwen2MoeConfig(
        hidden_size=D, moe_intermediate_size=FF, shared_expert_intermediate_size=20, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False, experts_implementation="eager",
    )  # fmt: skip
    block = modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(config)
    return block, {"experts": 6, "top_k": 2, "normalize": False, "shared_d_ff": 20, "shared_gate": True}


def _qwen3() -> tuple[torch.nn.Module, dict]:
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    config = transformers.Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=FF, num_experts=5, num_experts_per_tok=3, norm_topk_prob=True,
        experts_implementation="eager",
    )  # fmt: skip
    return modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(config), {"experts": 5, "top_k": 3}


def _deepseek() -> tuple[torch.nn.Module, dict]:
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    config = transformers.DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=FF, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True, experts_implementation="eager",
    )  # fmt: skip
    params = {
        "experts": 8, "top_k": 3, "scoring": "sigmoid", "groups": 4, "groups_kept": 2, "selection_bias": True,
        "scaling": 2.5, "shared_d_ff": 2 * FF,
    }  # fmt: skip
    return modeling_deepseek_v3.DeepseekV3MoE(config), params


REFERENCES = {"mixtral": _mixtral, "qwen2_moe": _qwen2, "qwen3_moe": _qwen3, "deepseek_v3": _deepseek}


def _ours(reference: torch.nn.Module, params: dict) -> MixtureOfExperts:
    """Our block with the reference's weights, named as `save_pretrained` writes them per expert."""
    ours = MixtureOfExperts(MixtureOfExperts.Params(d_model=D, d_ff=FF, **params))
    weights = {"router.weight": reference.gate.weight}
    if hasattr(reference.gate, "e_score_correction_bias"):
        weights["router.selection_bias"] = reference.gate.e_score_correction_bias
    for j in range(params["experts"]):
        gate, up = reference.experts.gate_up_proj[j].chunk(2, dim=0)
        weights |= {f"experts.{j}.w_1.weight": gate, f"experts.{j}.w_3.weight": up}
        weights[f"experts.{j}.w_2.weight"] = reference.experts.down_proj[j]
    shared = getattr(reference, "shared_expert", None) or getattr(reference, "shared_experts", None)
    if shared is not None:
        for n, projection in zip("132", ("gate", "up", "down"), strict=True):
            weights[f"shared.w_{n}.weight"] = getattr(shared, f"{projection}_proj").weight
    if getattr(reference, "shared_expert_gate", None) is not None:
        weights["shared_gate.weight"] = reference.shared_expert_gate.weight
    ours.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=True)
    return ours


def _pair(name: str) -> tuple[torch.nn.Module, MixtureOfExperts]:
    torch.manual_seed(0)
    reference, params = REFERENCES[name]()
    redraw(reference, seed=1)
    return reference.eval(), _ours(reference, params).eval()


def _inputs(seed: int = 2, batch: int = 3, seq: int = 7) -> torch.Tensor:
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(REFERENCES))
def test_the_block_computes_what_the_reference_module_does(name):
    reference, ours = _pair(name)
    x = _inputs()
    with torch.no_grad():
        expected = reference(x)
        got, _ = ours(x)
        chosen = ours.route(ours.scores(x.reshape(-1, D)))[1]
    counts = torch.bincount(chosen.reshape(-1), minlength=ours.p.experts)
    assert counts.max() > counts.min()  # the tokens route unevenly: some experts get more than others
    assert (got - expected).abs().max().item() <= 1e-5


def test_deepseek_s_bias_and_groups_change_the_choice_not_the_weights():
    """The selection bias moves which experts are chosen (so the comparison above could fail without it); the
    groups keep every choice within `groups_kept` groups."""
    _, ours = _pair("deepseek_v3")
    flat = _inputs().reshape(-1, D)
    with torch.no_grad():
        scores = ours.scores(flat)
        weights, chosen = ours.route(scores)
        bias = ours.router.selection_bias.clone()
        ours.router.selection_bias.zero_()
        unbiased = ours.route(scores)[1]
    assert not torch.equal(chosen.sort(-1)[0], unbiased.sort(-1)[0])
    groups = (chosen // 2).sort(-1)[0]  # 8 experts in 4 groups of 2
    assert all(len(set(row)) <= 2 for row in groups.tolist())
    chosen_scores = scores.gather(1, chosen)
    assert torch.allclose(weights, 2.5 * chosen_scores / chosen_scores.sum(-1, keepdim=True), atol=1e-6)
    assert bias.abs().sum() > 0


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "padded"])
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_aux_is_transformers_load_balancing_loss_of_the_layer(name, masked):
    reference, ours = _pair(name)
    x = _inputs()
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:], pad[2, 2:] = True, True
    with torch.no_grad():
        logits = reference.gate(x.reshape(-1, D))[0]
        _, aux = ours(x, pad if masked else None)
    mask = (~pad).long() if masked else None
    expected = modeling_mixtral.load_balancing_loss_func((logits,), ours.p.experts, ours.p.top_k, mask)
    assert aux.dtype == torch.float32 and aux.shape == ()
    assert abs(aux.item() - expected.item()) <= 1e-6
    if masked:  # padding is left out: the loss differs from the unmasked one
        unmasked = modeling_mixtral.load_balancing_loss_func((logits,), ours.p.experts, ours.p.top_k)
        assert abs(aux.item() - unmasked.item()) > 1e-4


def test_aux_adds_the_earlier_layers_and_only_the_router_gets_its_gradient():
    _, ours = _pair("mixtral")
    x = _inputs()
    _, alone = ours(x)
    _, summed = ours(x, None, torch.tensor(0.25))
    assert torch.allclose(summed, alone + 0.25, rtol=0, atol=1e-7)
    grads = torch.autograd.grad(alone, list(ours.parameters()), allow_unused=True)
    touched = [name for (name, _), g in zip(ours.named_parameters(), grads, strict=True) if g is not None and g.any()]
    assert touched == ["router.weight"]


def test_each_expert_runs_on_the_tokens_routed_to_it_only():
    """Without gradients an expert sees exactly its tokens' rows; with them every expert runs (some on no rows),
    so that all of them get a gradient, as FSDP needs."""
    _, ours = _pair("mixtral")
    x = _inputs(seq=3)
    seen: dict[int, int] = {}
    for j, expert in enumerate(ours.experts.children()):
        expert.register_forward_hook(lambda module, args, out, j=j: seen.__setitem__(j, args[0].size(0)))
    flat = x.reshape(-1, D)
    with torch.no_grad():
        chosen = ours.route(ours.scores(flat))[1]
        ours(x)
    counts = torch.bincount(chosen.reshape(-1), minlength=4).tolist()
    assert seen == {j: n for j, n in enumerate(counts) if n} and sum(seen.values()) == 2 * flat.size(0)
    one = x[:1, :1]  # one token: two experts run, the other two not at all
    seen.clear()
    with torch.no_grad():
        ours(one)
    assert sorted(seen.values()) == [1, 1]
    seen.clear()
    y, aux = ours(one)
    (y.sum() + aux).backward()
    assert sorted(seen.values()) == [0, 0, 1, 1]
    assert all(p.grad is not None for p in ours.parameters())


def test_the_flops_are_the_active_work_and_torch_counts_them_on_meta():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    params = MixtureOfExperts.Params(d_model=D, d_ff=FF, experts=6, top_k=2, shared_d_ff=20, shared_gate=True)
    with torch.device("meta"):
        meta = MixtureOfExperts(params)
        x, pad = torch.empty(3, 7, D), torch.empty(3, 7, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        y, aux = meta(x, pad)
    assert y.shape == (3, 7, D) and aux.shape == () and y.device.type == "meta"
    rows = 21
    expected = 2 * rows * D * 6 + 2 * 3 * 2 * rows * D * FF + 3 * 2 * rows * D * 20 + 2 * rows * D
    assert counter.get_total_flops() == expected == MixtureOfExperts.flops(params, {"x": x}, ())
    total = sum(p.numel() for p in meta.parameters())
    assert MixtureOfExperts.active_parameters(params, total) == total - 4 * 3 * D * FF


def test_bfloat16_and_int8_weights_stay_close_to_float32():
    reference, ours = _pair("qwen2_moe")
    x = _inputs()
    with torch.no_grad():
        expected = ours(x)[0]
        scale = expected.abs().max().item()
        half = precision.apply(_ours(reference, REFERENCES["qwen2_moe"]()[1]), "bfloat16").eval()
        got = half(x.bfloat16())[0]
        assert got.dtype == torch.bfloat16 and (got.float() - expected).abs().max().item() <= 0.05 * scale
        int8 = precision.apply(_ours(reference, REFERENCES["qwen2_moe"]()[1]), "int8").eval()
        assert type(int8.experts.get_submodule("0.w_1")) is precision.Int8Linear
        assert int8.router.weight.dtype == torch.float32  # the routing stays float
        assert (int8(x)[0] - expected).abs().max().item() <= 0.03 * scale


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"experts": 4, "top_k": 5}, r"top_k \(5\) must be at most experts \(4\)"),
        ({"experts": 6, "top_k": 2, "groups": 4}, r"experts \(6\) must be divisible by groups \(4\)"),
        ({"experts": 4, "top_k": 1, "groups": 4}, "at least 2 experts"),
        ({"experts": 8, "top_k": 5, "groups": 4, "groups_kept": 2}, r"raise groups_kept or lower top_k"),
        ({"experts": 8, "top_k": 2, "groups": 4, "groups_kept": 5}, r"groups_kept \(5\) must be at most groups"),
        ({"experts": 4, "top_k": 2, "shared_gate": True}, "give shared_d_ff too"),
    ],
)
def test_inconsistent_params_are_refused_with_what_to_change(params, message):
    with pytest.raises(ValidationError, match=message):
        MixtureOfExperts.Params(d_model=D, d_ff=FF, **params)


# --- in a model -------------------------------------------------------------------------------------------------


def _imported(tmp_path, model_class, config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A transformers model of `config`, weights redrawn, saved and imported: (it, our model)."""
    from blockgraph.builder import persist
    from blockgraph.trainer import pretrained

    torch.manual_seed(0)
    reference = model_class(config).eval()
    redraw(reference, seed=1)
    reference.save_pretrained(tmp_path / "hf")
    pretrained.import_pretrained(tmp_path / "hf", tmp_path / "out")
    return reference, persist.load(tmp_path / "out" / "model").eval()


def test_a_stack_sums_its_layers_load_balancing_losses(tmp_path):
    """Mixtral's spec outputs the logits and, as `aux`, the sum over its layers of each layer's loss as
    transformers computes it from that layer's router logits, padding left out."""
    config = transformers.MixtralConfig(
        vocab_size=40, hidden_size=D, intermediate_size=FF, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
    )  # fmt: skip
    reference, ours = _imported(tmp_path, transformers.MixtralForCausalLM, config)
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        theirs = reference(input_ids=tokens, attention_mask=(~pad).long())
        got = ours(tokens=tokens, pad=pad)
    per_layer = [
        modeling_mixtral.load_balancing_loss_func((logits,), 4, 2, (~pad).long()) for logits in theirs.router_logits
    ]
    assert len(per_layer) == 3 and abs(got["aux"].item() - sum(per_layer).item()) <= 1e-5
    assert (got["logits"] - theirs.logits).abs()[~pad].max().item() <= 1e-5


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"decoder_sparse_step": 2}, "decoder_sparse_step is '2'; the qwen2_moe spec implements 1"),
        ({"mlp_only_layers": [1]}, r"mlp_only_layers is '\[1\]'; the qwen2_moe spec implements \[\]"),
        ({"norm_topk_prob": True}, "norm_topk_prob is 'true'; the qwen2_moe spec implements false"),
    ],
)
def test_qwen2_moe_layers_that_are_not_all_sparse_are_refused(tmp_path, setting, message):
    from blockgraph.common.errors import CheckpointError
    from blockgraph.trainer import pretrained

    config = transformers.Qwen2MoeConfig(
        vocab_size=40, hidden_size=D, intermediate_size=FF, moe_intermediate_size=FF, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, **setting,
    )  # fmt: skip
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=message):
        pretrained.import_pretrained(tmp_path / "hf", tmp_path / "out")


def _moe_spec(output_reads_aux: bool) -> dict:
    moe = {"type": "mixture_of_experts", "params": {"d_model": D, "d_ff": FF, "experts": 4, "top_k": 2}}
    nodes = {
        "embed": {"type": "token_embedding", "params": {"vocab": 20, "dim": D}, "in": "tokens"},
        "moe": {**moe, "in": {"x": "embed", "pad": "pad"}},
        "mixed": {"type": "multiply", "in": ["moe.y", "moe.aux" if output_reads_aux else "embed"]},
        "out": {"type": "generator", "params": {"d_model": D, "vocab": 20, "output": "logits"}, "in": "mixed"},
    }
    inputs = {
        "tokens": {"dtype": "int64", "shape": ["batch", "seq"], "high": 20},
        "pad": {"dtype": "bool", "shape": ["batch", "seq"], "optional": True},
    }
    outputs = {"logits": "out", "aux": "moe.aux"}
    return {"name": "moe-lm", "dims": {"batch": 2, "seq": 5}, "inputs": inputs, "nodes": nodes, "outputs": outputs}


def test_decoding_steps_past_the_aux_output_unless_a_position_reads_it():
    """The balancing loss sums over all positions: a step leaves it aside, and a model whose per-position values
    read it re-runs every step instead (exact), saying why."""
    from blockgraph.builder import pipeline
    from blockgraph.builder.incremental import StepProgram, step_program

    for reads, expected in ((False, StepProgram), (True, None)):
        typed = pipeline.typed_graph(_moe_spec(reads))
        program = step_program(pipeline.compile_graph(typed), ["tokens", "pad"], "logits")
        if expected is not None:
            assert isinstance(program, expected)
        else:
            assert program.reason == (
                "block 'multiply' (node mixed) reads moe.aux, a value over all positions that a step does not compute"
            )

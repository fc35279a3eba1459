"""The hybrid spec (specs/hybrid.yaml: Mamba, attention and mixture-of-experts layers by a per-layer pattern) builds,
shows its layers' kinds, learns `--task copy` and decodes with each layer's own cache; and language models learn the
synthetic tasks from prompts: the source read, then `<sep>`, and only the target and eos scored."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from conftest import SPECS
from rich.console import Console

from blockgraph.blocks.attention import MultiHeadAttention
from blockgraph.blocks.state_space import Mamba
from blockgraph.blocks.stepping import StepCache
from blockgraph.builder import pipeline, views
from blockgraph.trainer import batching, corpus, decode, losses, tasks
from blockgraph.trainer.batching import Example
from blockgraph.trainer.config import DataOptions
from blockgraph.trainer.loop import TrainConfig, TrainResult, train
from blockgraph.trainer.roles import ModelIO
from blockgraph.trainer.vocab import BOS_ID, EOS_ID, PAD_ID

torch.set_num_threads(1)

HYBRID = SPECS / "hybrid.yaml"
HYBRID_SMALL = {"d_model": 32, "heads": 2, "kv_heads": 1, "d_ff": 64, "experts": 4, "layers": 4, "d_state": 4}
KINDS = ["mamba_mlp", "mamba_moe", "attention_mlp", "mamba_moe"]  # the spec's pattern on 4 layers
TASK = {"symbols": 10, "min_len": 3, "max_len": 8, "valid": 100}  # the default task, 100 held out


def _copy_config(spec, overrides: dict, steps: int, **recipe) -> TrainConfig:
    """`--task copy` for `steps` steps of 32 sequences, all in one epoch (evaluated once, at the end)."""
    return TrainConfig(
        spec=str(spec), overrides=overrides, task="copy", task_options={**TASK, "train": 32 * steps}, epochs=1,
        max_steps=steps, batch_size=32, label_smoothing=0.0, bleu_sentences=100, **recipe,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hybrid() -> TrainResult:
    """The hybrid at small sizes trained on the copy task: 250 steps (Xavier, Mamba's own initialisation kept)."""
    return train(_copy_config(HYBRID, HYBRID_SMALL, 250, lr=1e-2, warmup=20, clip_norm=1.0), quiet=True)


def test_a_prompt_is_read_and_only_the_target_and_eos_are_scored():
    sep = 14
    batch = batching.collate([Example([7, 8], prompt=[5, 6, sep]), Example([4], prompt=[9, sep])])
    assert batch.tgt_in.tolist() == [[BOS_ID, 5, 6, sep, 7, 8], [BOS_ID, 9, sep, 4, PAD_ID, PAD_ID]]
    assert batch.tgt_out.tolist() == [[5, 6, sep, 7, 8, EOS_ID], [9, sep, 4, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.tokens == 5  # 7, 8, eos; 4, eos
    log_probs = torch.randn(2, 6, 15).log_softmax(-1)
    gold = [(0, 3, 7), (0, 4, 8), (0, 5, EOS_ID), (1, 2, 4), (1, 3, EOS_ID)]  # (row, position, token)
    scored = sum(log_probs[row, position, token] for row, position, token in gold)
    torch.testing.assert_close(losses.batch_nll(log_probs, batch, 0.0, PAD_ID), -scored)
    right = torch.nn.functional.one_hot(batch.tgt_out, 15).float().log_softmax(-1)  # every position's argmax right
    assert losses.batch_correct(right, batch) == 5
    assert batching.collate([Example([7, 8]), Example([4])]).scored is None  # without prompts: as before


@pytest.mark.parametrize("task", tasks.TASKS)
def test_a_language_model_reads_the_task_source_then_the_separator_as_its_prompt(task):
    options = DataOptions(task=task, task_options={**TASK, "train": 40, "valid": 8})
    data = corpus.load(options, "lm")
    vocab = data.tgt_vocab
    assert data.src_vocab is None and vocab is not None and vocab.tokens[-1] == tasks.SEPARATOR
    for example in data.train + data.valid:
        assert example.src is None and example.prompt is not None and example.prompt[-1] == len(vocab) - 1
        assert example.prompt[:-1] == (example.tgt if task == "copy" else example.tgt[::-1])
    assert corpus.load(options, "lm", vocabs=(None, vocab)).train == data.train  # a resumed run reads the same


def test_a_decoder_language_model_learns_to_copy_its_prompt():
    """GPT-style (learned positions, d_model 64, 2 layers): ≥ 95% held-out token accuracy on the target after 400
    steps, and its greedy continuations of the held-out prompts copy them (BLEU against the targets)."""
    small = {"d_model": 64, "heads": 4, "layers": 2, "dropout": 0.0, "max_len": 32}
    result = train(_copy_config(SPECS / "gpt_decoder.yaml", small, 400, lr=5e-3, warmup=40, clip_norm=1.0), quiet=True)
    assert result.roles.kind == "lm" and result.step == 400
    assert result.history[-1]["valid_acc"] >= 0.95, result.history
    assert result.history[-1]["bleu"] >= 85, result.history


def test_the_hybrid_inspects_with_each_layer_s_kind():
    typed = pipeline.typed_graph(HYBRID, HYBRID_SMALL)
    model = pipeline.compile_graph(typed, device="meta")
    report = json.loads(views.inspect_report(typed, model, fmt="json"))
    kinds = {group["id"]: group["type"] for group in report["groups"]}
    assert [kinds[f"layers.{i}"] for i in range(4)] == KINDS
    blocks = {node["id"]: node["block"] for node in report["nodes"]}
    assert [blocks[f"layers.{i}.mixer"] for i in range(4)] == ["mamba", "mamba", "multi_head_attention", "mamba"]
    assert [blocks[f"layers.{i}.ffn"] for i in range(4)] == ["swiglu", "mixture_of_experts"] * 2
    console = Console(file=io.StringIO(), width=200)
    console.print(views.inspect_report(typed, model, depth=2))
    tree = console.file.getvalue()  # type: ignore[attr-defined]
    assert [kind for _, kind in re.findall(r"[├└]── (\d+)  (\w+)", tree)] == KINDS  # the copies under `layers`


def test_the_hybrid_learns_to_copy(hybrid):
    """≥ 95% held-out token accuracy within 250 steps; greedy decoding (step by step, each layer from its own
    cache) continues the held-out prompts with their copies."""
    assert hybrid.step == 250
    assert hybrid.history[-1]["valid_acc"] >= 0.95, hybrid.history
    assert hybrid.history[-1]["bleu"] >= 85, hybrid.history
    assert "train_loss_aux" in hybrid.history[-1]  # the experts' balancing loss was trained on


def test_the_trained_hybrid_decodes_step_by_step_as_a_full_rerun_with_flat_mamba_caches(hybrid):
    model = hybrid.model.eval()
    decoder = decode.Decoder(model, hybrid.roles)
    assert decoder.reason is None
    examples = [e for e in hybrid.corpus.valid if len(e.prompt) == 6][:3]  # type: ignore[arg-type]
    tokens = torch.tensor([[BOS_ID, *e.prompt, *e.tgt] for e in examples])  # type: ignore[misc]
    with torch.no_grad():
        full = ModelIO(hybrid.roles)(model, tokens)
    full[..., list(decoder.specials.never)] = float("-inf")
    state = decoder.start(None, None, capacity=tokens.size(1))
    mixers = [type(model.get_submodule(f"layers.{i}.mixer")) for i in range(4)]
    assert mixers == [Mamba, Mamba, MultiHeadAttention, Mamba]
    sizes = []
    with torch.no_grad():
        stepped = decoder.next_log_probs(state, tokens[:, :7])  # bos and the prompt at once
        torch.testing.assert_close(stepped, full[:, 6], atol=1e-5, rtol=0)
        for position in range(7, tokens.size(1)):
            stepped = decoder.next_log_probs(state, tokens[:, position : position + 1])
            torch.testing.assert_close(stepped, full[:, position], atol=1e-5, rtol=0)
            sizes.append([(cache.nbytes(), _written(cache)) for cache in state.caches])
    assert len(sizes) >= 3
    for layer, mixer in enumerate(mixers):
        held = [step[layer] for step in sizes]
        if mixer is Mamba:  # the convolution's last inputs and the state: the same bytes, nothing growing
            assert held[0] == held[-1] and held[0][0] > 0 and held[0][1] == 0, held
        else:  # keys and values of every position read so far
            assert [written for _, written in held] == list(range(8, tokens.size(1) + 1)), held


def _written(cache: StepCache) -> int:
    """The most positions written into a growing buffer of `cache` or its children (0: none grows)."""
    return max([written for _, written in cache.filled.values()] + [_written(c) for c in cache.children.values()] + [0])


def test_xavier_initialisation_leaves_what_a_block_draws_as_its_own():
    """`--init xavier` redraws every weight matrix but Mamba's decay rates (A = −(1 … N)), Δ's projection and its
    depthwise convolution's kernel."""
    from blockgraph.trainer.loop import initialise

    model = pipeline.build(HYBRID, overrides=HYBRID_SMALL)
    mamba = model.get_submodule("layers.0.mixer")
    assert isinstance(mamba, Mamba)
    drawn = {name: p.detach().clone() for name, p in model.named_parameters()}
    initialise(model)
    rates = torch.log(torch.arange(1, 5, dtype=torch.float32)).expand(mamba.d_inner, 4)
    assert torch.equal(mamba.A_log, rates)
    kept = {name for name, p in model.named_parameters() if torch.equal(p, drawn[name])}
    matrices = {name for name, p in model.named_parameters() if p.dim() > 1}
    assert {name for name in matrices & kept} == {
        name for name in matrices if name.endswith(("mixer.A_log", "mixer.dt_proj.weight", "mixer.conv1d.weight"))
    }

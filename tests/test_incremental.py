"""Incremental decoding: every step's log-probabilities equal a full re-run's, for every shipped decoder spec,
with padded batches and reordered rows; batched search finds what each sentence finds alone; sampling follows
the filtered distribution; a block that cannot step makes the model re-run, and says which."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import ROOT, SPECS

from blockgraph import builder
from blockgraph.blocks import REGISTRY, Block, Port, TensorType, register
from blockgraph.blocks.stepping import StepCache
from blockgraph.builder.incremental import Rerun, StepProgram
from blockgraph.trainer import decode
from blockgraph.trainer.roles import ModelIO, find_roles
from blockgraph.trainer.vocab import BOS_ID, EOS_ID, PAD_ID

torch.set_num_threads(1)

VOCAB = 13
SMALL = {
    "vocab": VOCAB, "src_vocab": VOCAB, "tgt_vocab": VOCAB, "d_model": 16, "heads": 2, "kv_heads": 1, "d_ff": 32,
    "emb": 16, "hidden": 16, "layers": 2, "enc_layers": 2, "dec_layers": 2, "dropout": 0.0, "window": 3, "d_kv": 4,
    "head_dim": 8, "experts": 4, "top_k": 2, "shared_d_ff": 24, "pattern": 2, "attn_softcap": 1.0, "final_softcap": 2.0,
    "rope_factor": 4.0, "q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
    "v_head_dim": 4, "moe_d_ff": 8, "groups": 2, "groups_kept": 1, "dense_layers": 1,
    "attn_period": 2, "attn_offset": 0,  # the hybrid's 2 layers: attention with a SwiGLU, then Mamba with experts
}  # fmt: skip
DECODERS = [
    "transformer", "transformer_tied", "gpt_decoder", "lstm_lm", "rnn_seq2seq_attention", "rnn_seq2seq_local",
    "rnn_seq2seq_hard", "rnn_seq2seq_input_feeding", "gpt2", "llama", "mistral", "gpt_neox", "marian_zh_en",
    "bart", "t5", "qwen2", "qwen3", "olmo2", "phi3", "mixtral", "gemma", "gemma2", "gemma3_text",
    "qwen2_moe", "deepseek_v3", "qwen3_moe", "mamba", "hybrid",
]  # fmt: skip


def _decoder(name: str, seed: int = 0, sharpen: float = 1.0) -> decode.Decoder:
    """The shipped spec at small sizes (every variable it has), random weights."""
    path = SPECS / f"{name}.yaml"
    variables = builder.load_spec(path).spec.vars or {}
    torch.manual_seed(seed)
    model = builder.build(path, overrides={k: v for k, v in SMALL.items() if k in variables}).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(sharpen)
    return decode.Decoder(model, find_roles(model.typed_graph.graph, types=model.typed_graph.types))


def _sources(decoder: decode.Decoder, lengths: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random sources of these lengths, padded (with a padding mask where the model takes one), or None."""
    if decoder.roles.src is None:
        return None, None
    if decoder.roles.src_pad is None:
        lengths = [max(lengths)] * len(lengths)  # no mask: every source is full length
    src = torch.full((len(lengths), max(lengths)), PAD_ID)
    for row, length in enumerate(lengths):
        src[row, :length] = torch.randint(4, VOCAB, (length,))
        src[row, length - 1] = EOS_ID
    return src, (src == PAD_ID if decoder.roles.src_pad is not None else None)


def _full(decoder: decode.Decoder, tgt: torch.Tensor, src: torch.Tensor | None, src_pad: torch.Tensor | None):
    """Log-probabilities at every target position from one forward over the whole target."""
    io = ModelIO(decoder.roles)
    tgt_pad = torch.zeros_like(tgt, dtype=torch.bool) if decoder.roles.tgt_pad is not None else None
    with torch.no_grad():
        return io(decoder.model, tgt, src, src_pad, tgt_pad)


def _stepped(decoder: decode.Decoder, tgt: torch.Tensor, src, src_pad, first: int, order: Iterator) -> list:
    """Log-probabilities from decoding `tgt` step by step: `first` positions at once, then one at a time, the
    rows reordered by `order` (rows kept, repeats allowed) before each step; → the steps' [rows, vocab]."""
    state = decoder.start(src, src_pad, capacity=tgt.size(1))
    rows = torch.arange(tgt.size(0))
    with torch.no_grad():
        steps = [(rows, decoder.next_log_probs(state, tgt[:, :first]))]
        for position in range(first, tgt.size(1)):
            index = next(order)
            state.reorder(index)
            rows = rows[index]
            steps.append((rows, decoder.next_log_probs(state, tgt[rows, position : position + 1])))
    return steps


def _reorders(rows: int) -> Iterator[torch.Tensor]:
    """Keep all, swap, duplicate one row over another, shrink to fewer rows: what beam search does."""
    yield torch.arange(rows)
    yield torch.arange(rows).flip(0)
    yield torch.tensor([0, 0, *range(2, rows)])
    yield torch.arange(rows - 1)
    while True:
        yield torch.arange(rows - 1)


@pytest.mark.parametrize("name", DECODERS)
def test_every_step_equals_a_full_rerun(name):
    decoder = _decoder(name)
    assert isinstance(decoder.program, StepProgram), decoder.reason
    src, src_pad = _sources(decoder, [7, 4, 2])
    tgt = torch.cat((torch.full((3, 1), BOS_ID), torch.randint(4, VOCAB, (3, 8))), dim=1)
    full = _full(decoder, tgt, src, src_pad)
    steps = _stepped(decoder, tgt, src, src_pad, first=3, order=_reorders(3))
    full[..., [PAD_ID, BOS_ID]] = float("-inf")  # never generated: the decoder rules them out
    torch.testing.assert_close(steps[0][1], full[:, 2], atol=1e-5, rtol=0)
    for position, (rows, log_probs) in enumerate(steps[1:], start=3):
        torch.testing.assert_close(log_probs, full[rows, position], atol=1e-5, rtol=0)


def _beam_reorders() -> Iterator[torch.Tensor]:
    """What beam search does to 3 sources: 2 hypotheses each, swapped and duplicated within their source, then
    the middle source leaves; then rows no longer grouped by source (every row its own copy of its source)."""
    yield torch.tensor([0, 0, 1, 1, 2, 2])
    yield torch.tensor([1, 0, 2, 2, 5, 4])
    yield torch.tensor([0, 1, 5, 5])
    yield torch.tensor([3, 0, 1])
    while True:
        yield torch.arange(3)


def _fixed_rows(decoder: decode.Decoder, state) -> set[int]:
    """The rows of every tensor the caches computed once from the sources (the memory's keys and values)."""

    def walk(cache: StepCache) -> Iterator[int]:
        yield from (cache.tensors[name].size(0) for name in cache.fixed)
        for child in cache.children.values():
            yield from walk(child)

    return {rows for cache in state.caches for rows in walk(cache)}


@pytest.mark.parametrize("name", DECODERS)
def test_beam_shaped_reorders_step_as_a_full_rerun_sharing_each_sources_memory(name):
    """Hypotheses grouped by source read the source's memory once: the cross-attention keys and values keep one
    row per source (never copied per beam) while the log-probabilities stay those of a full re-run."""
    decoder = _decoder(name)
    src, src_pad = _sources(decoder, [7, 4, 2])
    tgt = torch.cat((torch.full((3, 1), BOS_ID), torch.randint(4, VOCAB, (3, 7))), dim=1)
    full = _full(decoder, tgt, src, src_pad)
    full[..., [PAD_ID, BOS_ID]] = float("-inf")
    state = decoder.start(src, src_pad, capacity=tgt.size(1))
    rows, order, sources = torch.arange(3), _beam_reorders(), [3, 3, 2, 3, 3]
    with torch.no_grad():
        decoder.next_log_probs(state, tgt[:, :2])
        for position, held in zip(range(2, tgt.size(1)), sources, strict=False):
            index = next(order)
            state.reorder(index)
            rows = rows[index]
            log_probs = decoder.next_log_probs(state, tgt[rows, position : position + 1])
            torch.testing.assert_close(log_probs, full[rows, position], atol=1e-5, rtol=0)
            if decoder.program.plan.shares and _fixed_rows(decoder, state):
                assert _fixed_rows(decoder, state) == {held}, "the memory was copied per hypothesis"
    if name in ("transformer", "marian_zh_en", "bart", "t5"):
        assert decoder.program.plan.shares


SEQ2SEQ = [
    "transformer", "transformer_tied", "rnn_seq2seq_attention", "rnn_seq2seq_local", "rnn_seq2seq_hard",
    "rnn_seq2seq_input_feeding", "marian_zh_en", "bart", "t5",
]  # fmt: skip


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_a_padded_source_decodes_as_it_does_alone(name):
    """Source padding never leaks into the steps: a short source in a padded batch gets its own log-probs."""
    decoder = _decoder(name)
    assert decoder.roles.src_pad is not None
    src, src_pad = _sources(decoder, [7, 3])
    tgt = torch.cat((torch.full((2, 1), BOS_ID), torch.randint(4, VOCAB, (2, 5))), dim=1)
    keep = iter(lambda: torch.arange(2), None)
    together = _stepped(decoder, tgt, src, src_pad, first=1, order=keep)
    keep = iter(lambda: torch.arange(1), None)
    alone = _stepped(decoder, tgt[1:], src[1:, :3], src_pad[1:, :3], first=1, order=keep)
    for (_, batched), (_, single) in zip(together, alone, strict=True):
        torch.testing.assert_close(batched[1:], single, atol=1e-5, rtol=0)


def _alone(search, decoder: decode.Decoder, given: dict, lengths: list[int], **options) -> list:
    """`search` run on each sentence of the batch `given` by itself (its source unpadded)."""
    found = []
    for row, length in enumerate(lengths):
        if "src" in given:
            pad = given["src_pad"]
            cut = length if pad is not None else given["src"].size(1)
            one = {
                "src": given["src"][row : row + 1, :cut],
                "src_pad": None if pad is None else pad[row : row + 1, :cut],
            }
        else:
            one = {"prompt": given["prompt"][row : row + 1]}
        found.append(search(decoder, **one, **options)[0])
    return found


SEARCHED = ["transformer", "rnn_seq2seq_attention", "rnn_seq2seq_local", "t5", "gpt2", "lstm_lm"]


@pytest.mark.parametrize("name", SEARCHED)
def test_batched_beam_search_finds_what_each_sentence_finds_alone(name):
    decoder = _decoder(name, sharpen=1.6)  # peaked distributions: hypotheses end at different steps
    lengths = [6, 3, 5, 2]
    src, src_pad = _sources(decoder, lengths)
    prompt = None if src is not None else torch.randint(4, VOCAB, (4, 3))
    given = {"prompt": prompt} if prompt is not None else {"src": src, "src_pad": src_pad}
    for beam, alpha in ((3, 0.0), (2, 0.6)):
        options = {"beam": beam, "alpha": alpha, "n_best": 2, "max_len": 6}
        batched = decode.beam_search(decoder, **given, **options)
        alone = _alone(decode.beam_search, decoder, given, lengths, **options)
        assert [[h.tokens for h in found] for found in batched] == [[h.tokens for h in found] for found in alone]
        for found, single in zip(batched, alone, strict=True):
            assert [h.score for h in found] == pytest.approx([h.score for h in single], abs=1e-5)
    greedy = decode.greedy(decoder, **given, max_len=6)
    assert [h.tokens for h in greedy] == [h.tokens for h in _alone(decode.greedy, decoder, given, lengths, max_len=6)]


def test_sentences_stop_at_their_own_length_limit():
    decoder = _decoder("transformer", sharpen=1.6)
    src, src_pad = _sources(decoder, [5, 5, 5])
    limits = torch.tensor([1, 4, 2])
    for found in (
        decode.greedy(decoder, src, src_pad, max_len=limits),
        decode.beam_search(decoder, src, src_pad, max_len=limits),
    ):
        hypotheses = [h if isinstance(h, decode.Hypothesis) else h[0] for h in found]
        for h, most in zip(hypotheses, limits.tolist(), strict=True):
            ended = bool(h.tokens) and h.tokens[-1] == EOS_ID
            assert len(h.tokens) <= most if ended else len(h.tokens) == most


def _first_tokens(decoder: decode.Decoder, draws: int, **options) -> Counter:
    found = decode.sample(decoder, rows=draws, max_len=1, seed=3, **options)
    return Counter(h.tokens[0] for h in found)


def _follows(counts: Counter, expected: torch.Tensor) -> None:
    """Every token's frequency within 5 standard deviations of its expected probability (zero: never drawn)."""
    draws = sum(counts.values())
    for token, p in enumerate(expected.tolist()):
        assert abs(counts[token] / draws - p) <= 5 * (p * (1 - p) / draws) ** 0.5, (token, counts[token], p)


def test_sampling_follows_the_filtered_distribution():
    decoder = _decoder("gpt_decoder")
    with torch.no_grad():
        first = decoder.next_log_probs(decoder.start(None, None, 1), torch.full((1, 1), BOS_ID))[0].exp().double()
    first /= first.sum()  # pad and bos are ruled out: the rest shares their probability
    ranked = first.argsort(descending=True)

    def kept(tokens: torch.Tensor, p: torch.Tensor = first) -> torch.Tensor:
        only = torch.zeros_like(p)
        only[tokens] = p[tokens]
        return only / only.sum()

    _follows(_first_tokens(decoder, 4000), first)
    _follows(_first_tokens(decoder, 4000, temperature=0.5), first**2 / (first**2).sum())
    _follows(_first_tokens(decoder, 4000, top_k=3), kept(ranked[:3]))
    nucleus = int((first[ranked].cumsum(0) < 0.5).sum()) + 1  # the fewest most likely tokens that reach 0.5
    _follows(_first_tokens(decoder, 4000, top_p=0.5), kept(ranked[:nucleus]))


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy():
    decoder = _decoder("lstm_lm")
    prompt = torch.randint(4, VOCAB, (3, 2))
    one = decode.sample(decoder, prompt=prompt, max_len=8, seed=11)
    assert one == decode.sample(decoder, prompt=prompt, max_len=8, seed=11)
    others = [decode.sample(decoder, prompt=prompt, max_len=8, seed=s) for s in range(12, 16)]
    assert any(other != one for other in others)
    assert [h.tokens for h in decode.sample(decoder, prompt=prompt, max_len=8, top_k=1)] == [
        h.tokens for h in decode.greedy(decoder, prompt=prompt, max_len=8)
    ]
    with pytest.raises(ValueError, match="temperature"):
        decode.sample(decoder, prompt=prompt, temperature=0.0)


@pytest.fixture
def unsteppable(restored_registry):
    """A plugin block that declares no step behaviour: a learned gate on every position."""

    @register("test_gate", family="test")
    class Gate(Block):
        """x · σ(w)."""

        in_ports = (Port("x"),)

        def __init__(self, params):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        @classmethod
        def infer(cls, p, x: TensorType) -> TensorType:
            return x

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(self.w)

    return "test_gate"


def _language_model(*middle: tuple[str, dict]) -> dict[str, Any]:
    """A one-layer causal language model over VOCAB tokens with the (name, node) pairs after its embedding."""
    nodes = {"emb": {"type": "token_embedding", "params": {"vocab": VOCAB, "dim": 8}, "in": "tokens"}}
    last = "emb"
    for name, node in middle:
        nodes[name] = {**node, "in": last}
        last = name
    nodes["gen"] = {"type": "generator", "params": {"d_model": 8, "vocab": VOCAB}, "in": last}
    return {
        "name": "lm",
        "inputs": {"tokens": {"dtype": "int64", "shape": ["batch", "seq"]}},
        "nodes": nodes,
        "outputs": "gen",
    }


def _steps_equal_a_full_run(decoder: decode.Decoder, src=None, src_pad=None, rows: int = 3) -> None:
    tgt = torch.cat((torch.full((rows, 1), BOS_ID), torch.randint(4, VOCAB, (rows, 6))), dim=1)
    full = _full(decoder, tgt, src, src_pad)
    full[..., [PAD_ID, BOS_ID]] = float("-inf")
    steps = _stepped(decoder, tgt, src, src_pad, first=2, order=_reorders(rows))
    torch.testing.assert_close(steps[0][1], full[:, 1], atol=1e-5, rtol=0)
    for position, (index, log_probs) in enumerate(steps[1:], start=2):
        torch.testing.assert_close(log_probs, full[index, position], atol=1e-5, rtol=0)


RECURRENCES = [
    {"type": "rnn", "params": {"input_size": 8, "hidden_size": 8, "layers": 2}},
    {"type": "gru", "params": {"input_size": 8, "hidden_size": 8, "layers": 2}},
    {"type": "lstm", "params": {"input_size": 8, "hidden_size": 8, "layers": 2, "implementation": "gates"}},
]


@pytest.mark.parametrize("recurrence", RECURRENCES, ids=lambda r: r["type"])
def test_recurrences_carry_their_state(recurrence, write_spec):
    spec = _language_model(("rnn", recurrence))
    spec["nodes"]["gen"]["in"] = "rnn.y"
    model = builder.build(write_spec(spec)).eval()
    decoder = decode.Decoder(model, find_roles(model.typed_graph.graph))
    assert isinstance(decoder.program, StepProgram), decoder.reason
    _steps_equal_a_full_run(decoder)


def test_scaled_dot_product_attention_keeps_keys_and_values(write_spec):
    spec = _language_model()
    spec["nodes"]["sdpa"] = {
        "type": "scaled_dot_product_attention",
        "params": {"causal": True},
        "in": {"query": "emb", "key": "emb", "value": "emb"},
    }
    spec["nodes"]["gen"]["in"] = "sdpa.y"
    spec["nodes"] = {k: spec["nodes"][k] for k in ("emb", "sdpa", "gen")}
    model = builder.build(write_spec(spec)).eval()
    decoder = decode.Decoder(model, find_roles(model.typed_graph.graph))
    assert isinstance(decoder.program, StepProgram), decoder.reason
    _steps_equal_a_full_run(decoder)


def test_monotonic_local_attention_counts_target_positions(tmp_path):
    import yaml

    spec = yaml.safe_load((SPECS / "rnn_seq2seq_local.yaml").read_text(encoding="utf-8"))
    spec["extends"] = str(SPECS / "rnn_seq2seq_attention.yaml")
    spec["nodes"]["attn"]["params"]["mode"] = "monotonic"
    path = tmp_path / "local_m.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    sizes = {k: v for k, v in SMALL.items() if k in ("src_vocab", "tgt_vocab", "emb", "hidden", "layers", "dropout")}
    model = builder.build(path, overrides={**sizes, "window": 2}, allow_external_files=True).eval()
    decoder = decode.Decoder(model, find_roles(model.typed_graph.graph))
    assert isinstance(decoder.program, StepProgram), decoder.reason
    src, src_pad = _sources(decoder, [7, 4, 2])
    _steps_equal_a_full_run(decoder, src, src_pad)


def test_a_block_without_steps_makes_the_model_rerun_and_says_which(unsteppable, write_spec):
    attention = {"type": "multi_head_attention", "params": {"d_model": 8, "heads": 2, "causal": True}}
    spec = _language_model(("gate", {"type": unsteppable}), ("attn", attention))
    model = builder.build(write_spec(spec)).eval()
    decoder = decode.Decoder(model, find_roles(model.typed_graph.graph))
    assert isinstance(decoder.program, Rerun)
    assert "'test_gate' (node gate)" in decoder.reason
    _steps_equal_a_full_run(decoder)


@pytest.fixture
def running_mean(restored_registry, tmp_path):
    """docs/writing-blocks.md's example of a block that keeps state between steps, loaded as the plugin it is."""
    from blockgraph.builder.plugins import load_plugin

    text = (ROOT / "docs" / "writing-blocks.md").read_text(encoding="utf-8")
    code = text.split("## Decoding step by step")[1].split("```python\n")[1].split("```")[0]
    (tmp_path / "my_running_mean.py").write_text(code, encoding="utf-8")
    load_plugin(str(tmp_path / "my_running_mean.py"))
    return "my_running_mean"


def test_a_plugin_block_that_keeps_state_steps(running_mean, write_spec):
    attention = {"type": "multi_head_attention", "params": {"d_model": 8, "heads": 2, "causal": True}}
    model = builder.build(write_spec(_language_model(("sum", {"type": running_mean}), ("attn", attention)))).eval()
    decoder = decode.Decoder(model, find_roles(model.typed_graph.graph))
    assert isinstance(decoder.program, StepProgram) and "_m['sum'].step(caches[0], emb)" in decoder.program.code
    _steps_equal_a_full_run(decoder)


@pytest.mark.parametrize(
    ("answer", "message"),
    [("position", "stepping returned 'position'"), ("state", "says 'state' but the block has no step")],
)
def test_a_wrong_stepping_rule_reruns_and_says_why(unsteppable, write_spec, answer, message):
    REGISTRY.get(unsteppable).cls.stepping = classmethod(lambda cls, p, ports: answer)
    model = builder.build(write_spec(_language_model(("gate", {"type": unsteppable})))).eval()
    decoder = decode.Decoder(model, find_roles(model.typed_graph.graph))
    assert isinstance(decoder.program, Rerun) and message in decoder.reason


def test_causal_attention_to_a_fixed_memory_does_not_step():
    from blockgraph.blocks.attention import MultiHeadAttention

    params = MultiHeadAttention.Params(d_model=8, heads=2, causal=True)
    assert MultiHeadAttention.stepping(params, {"query": True, "key": False}) is None
    plain = MultiHeadAttention.Params(d_model=8, heads=2)
    assert MultiHeadAttention.stepping(plain, {"query": True, "key": False}) == "state"


def test_the_rerun_is_noted_once_naming_the_block(unsteppable, write_spec, tmp_path):
    from blockgraph.trainer.checkpoint import Checkpoint
    from blockgraph.trainer.generation import Translator
    from blockgraph.trainer.vocab import SPECIALS, Vocab

    model = builder.build(write_spec(_language_model(("gate", {"type": unsteppable})))).eval()
    roles = find_roles(model.typed_graph.graph)
    vocab = Vocab([*SPECIALS, *(f"w{i}" for i in range(VOCAB - len(SPECIALS)))])
    saved = Checkpoint(tmp_path, model, None, vocab, {"roles": roles.to_json()}, {})
    notes: list[str] = []
    translator = Translator.of_checkpoint(saved, note=notes.append)
    outputs = list(translator.generate(["w1 w2", "w3"], max_new=3))
    assert [o[0].text.split()[: len(p.split())] for o, p in zip(outputs, ["w1 w2", "w3"], strict=True)] == [
        ["w1", "w2"],
        ["w3"],
    ]
    assert notes == [
        "decoding re-runs the whole model at every step: block 'test_gate' (node gate) cannot decode step by step"
    ]


def test_a_decoder_that_sees_the_whole_target_cannot_step(write_spec):
    """Bidirectional self-attention over the target: every position depends on later ones."""
    layer = {"type": "encoder_layer", "params": {"d_model": 8, "heads": 2, "d_ff": 16}}
    spec = _language_model(("enc", layer))
    model = builder.build(write_spec(spec)).eval()
    decoder = decode.Decoder(model, find_roles(model.typed_graph.graph))
    assert isinstance(decoder.program, Rerun) and "'encoder_layer' (node enc)" in decoder.reason
    (found,) = decode.greedy(decoder, max_len=4)
    assert len(found.tokens) <= 4


def test_the_step_program_is_readable_python():
    decoder = _decoder("transformer")
    code = decoder.program.code
    assert code.startswith("def start(self, src") and "\ndef step(self, caches, carried, tgt" in code
    assert "_m['tgt_position'].step(caches[0]," in code  # the position table keeps its offset
    assert "m_decoder['0'].step(caches[1]," in code  # the first decoder layer keeps its keys and values
    assert "_m['encoder']" not in code.split("def step")[1]  # the encoder runs once, in start


def test_step_cache_grows_reorders_and_counts():
    cache = StepCache(capacity=3, ports={"x": True})
    first = torch.arange(2 * 2, dtype=torch.float32).view(2, 2, 1)
    assert cache.extend("k", first, dim=1).tolist() == first.tolist()
    assert cache.tensors["k"].shape == (2, 3, 1)  # allocated at the capacity
    more = torch.full((2, 2, 1), 9.0)
    grown = cache.extend("k", more, dim=1)  # past the capacity: the buffer grows, what was written stays
    assert torch.equal(grown, torch.cat((first, more), dim=1)) and cache.tensors["k"].size(1) >= 4
    cache.tensors["h"] = torch.tensor([[1.0], [2.0]])
    child = cache.child("attn", {"x": True})
    child.extend("v", first, dim=1)
    cache.reorder(torch.tensor([1, 1, 0]))
    assert torch.equal(cache.extend("k", torch.zeros(3, 0, 1), dim=1), torch.cat((first, more), dim=1)[[1, 1, 0]])
    assert cache.tensors["h"].flatten().tolist() == [2.0, 2.0, 1.0]
    assert torch.equal(child.tensors["v"].narrow(1, 0, 2), first[[1, 1, 0]])
    sizes = [t.numel() * 4 for t in (cache.tensors["k"], cache.tensors["h"], child.tensors["v"])]
    assert cache.nbytes() == sum(sizes)
    assert cache.grows("x") and not cache.grows("memory")


def test_a_sliding_window_keeps_only_the_window_and_steps_exactly_past_it():
    """Mistral's window of 3: a prompt longer than the window, then single steps far past it, under beam-like
    reorders, equal the full re-run; the caches stop growing once the window is full."""
    decoder = _decoder("mistral")
    tgt = torch.cat((torch.full((3, 1), BOS_ID), torch.randint(4, VOCAB, (3, 13))), dim=1)
    full = _full(decoder, tgt, None, None)
    full[..., [PAD_ID, BOS_ID]] = float("-inf")
    steps = _stepped(decoder, tgt, None, None, first=5, order=_reorders(3))
    torch.testing.assert_close(steps[0][1], full[:, 4], atol=1e-5, rtol=0)
    for position, (rows, log_probs) in enumerate(steps[1:], start=5):
        torch.testing.assert_close(log_probs, full[rows, position], atol=1e-5, rtol=0)

    state = decoder.start(None, None, capacity=64)
    sizes = []
    with torch.no_grad():
        for position in range(12):
            decoder.next_log_probs(state, tgt[:, position : position + 1])
            sizes.append(state.cache_bytes())
    assert sizes[2] == sizes[-1]  # the window (3) is full after 3 positions: nothing more is held
    window = SMALL["window"] * SMALL["d_model"] // SMALL["heads"] * SMALL["kv_heads"]  # per row, per layer, k or v
    assert sizes[-1] == SMALL["layers"] * 2 * 3 * window * 4  # 2 layers × (k, v) × 3 rows × float32


def test_a_ring_attends_exactly_the_window_whatever_the_step_sizes():
    """StepCache.ring against the positions it says its slots hold, for steps of 1 and of several positions."""
    cache = StepCache(capacity=64, ports={"x": True})
    written = []
    start = 0
    for count in (2, 1, 5, 1, 1, 4):
        new = torch.arange(start, start + count, dtype=torch.float32).view(1, count, 1)
        seen, positions = cache.ring("k", new, 1, 3, start)
        written += list(range(start, start + count))
        valid = positions >= 0
        assert seen.flatten()[valid].tolist() == positions[valid].tolist()  # each entry is the position it says
        assert set(positions[valid].tolist()) >= {p for p in written if p > start - 3}  # the first new one's window
        assert cache.tensors["k"].size(1) == 3
        start += count


def test_a_sliding_window_with_a_relative_position_bias_steps_as_its_full_run(write_spec):
    """The bias has a column per key so far, in position order: such an attention keeps every position."""
    spec = _language_model()
    bias = {"type": "relative_position_bias", "params": {"heads": 2, "bidirectional": False}, "in": "emb"}
    window = {"d_model": 8, "heads": 2, "causal": True, "window": 2}
    attention = {"type": "multi_head_attention", "params": window, "in": {"query": "emb", "position_bias": "bias"}}
    spec["nodes"] = {"emb": spec["nodes"]["emb"], "bias": bias, "attn": attention, "gen": {**spec["nodes"]["gen"]}}
    spec["nodes"]["gen"]["in"] = "attn"
    model = builder.build(write_spec(spec)).eval()
    decoder = decode.Decoder(model, find_roles(model.typed_graph.graph))
    assert isinstance(decoder.program, StepProgram), decoder.reason
    _steps_equal_a_full_run(decoder)

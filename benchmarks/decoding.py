"""Decoding speed against Hugging Face `generate`: the same model, weight for weight, the same number of steps.

Marian (specs/marian_zh_en.yaml: 6 + 6 layers, d_model 512) translates batches of 8 and 32 sources of 32
tokens, and GPT-2 (specs/gpt2.yaml, 124M) continues 8 prompts of 32 tokens (32 would take minutes a round with a
beam of 4), by 40 new tokens each, greedily and with a beam of 4. Both sides are built with random weights; the
reference's are copied into the spec through the family's table in builder/hf_mappings.py. Marian's fixed
output bias keeps eos, pad and bos out of reach (−10⁴), and GPT-2 suppresses them on both sides, so both run
all 40 steps (`generate` gets `min_new_tokens` = `max_new_tokens` as well). The ratio is our tokens per second
over the reference's (its time / ours).

Each side also runs in its lower precisions: ours through builder.precision (bfloat16 weights; int8 Linear
weights, per channel), Hugging Face's cast to bfloat16 and through torch's dynamic int8 quantization of its
`nn.Linear` layers (per tensor; GPT-2's Conv1D layers are not `nn.Linear` and stay float32). Rows compare
float32 with float32, then the reference's fastest precision with each of ours; the target holds on the row of
our fastest. Each row says how many sentences got the very same tokens from both, and from each side's own
float32 run. A last row times `--compile`'s step against the eager one, on Marian greedily.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks.cases import Config, Row, compiler_unavailable, row
from benchmarks.timing import Timing, compare
from blockgraph import builder
from blockgraph.builder import precision
from blockgraph.builder.families import FAMILIES
from blockgraph.builder.hf_mappings import convert
from blockgraph.builder.persist import unique_tensors
from blockgraph.trainer import decode
from blockgraph.trainer.roles import find_roles
from blockgraph.trainer.vocab import BOS_ID, EOS_ID, PAD_ID

SPECS = Path(__file__).resolve().parent.parent / "specs"
SOURCE, NEW, VOCAB = 32, 40, 8000
BATCHES = {"Marian": (8, 32), "GPT-2": (8,)}
PRECISIONS = ("float32", "bfloat16", "int8")
TARGET = 1.5
Tokens = list[tuple[int, ...]]


def dims(name: str, batch: int) -> str:
    if name == "Marian":
        return f"6+6 layers, d_model 512, vocab {VOCAB}, batch {batch}, source {SOURCE}, {NEW} new"
    return f"124M, batch {batch}, prompt {SOURCE}, {NEW} new"


def _copy(family: str, reference: torch.nn.Module, ours: torch.nn.Module, heads: int | None = None) -> None:
    state, _ = convert(FAMILIES[family], reference.state_dict(), heads=heads)
    targets, _ = unique_tensors(ours)
    with torch.no_grad():
        for name, value in state.items():
            targets[name].copy_(value)


def _hf_cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a Hugging Face cache object holds (whatever its layout)."""
    seen: set[int] = set()
    total = 0

    def walk(value: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 6 or id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, depth + 1)
        elif hasattr(value, "__dict__"):
            for item in vars(value).values():
                walk(item, depth + 1)

    walk(cache)
    return total


def marian_reference() -> transformers.MarianMTModel:
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=VOCAB, decoder_vocab_size=VOCAB, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID, forced_eos_token_id=None, max_position_embeddings=512, d_model=512,
        encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish", scale_embedding=True,
    )  # fmt: skip
    reference = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        reference.final_logits_bias[0, [PAD_ID, BOS_ID, EOS_ID]] = -1e4
    return reference


def gpt2_reference() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return transformers.GPT2LMHeadModel(config).eval()


REFERENCES: dict[str, Callable[[], torch.nn.Module]] = {"Marian": marian_reference, "GPT-2": gpt2_reference}
OURS = {  # spec, overrides, family in builder/families
    "Marian": (SPECS / "marian_zh_en.yaml", {"vocab": VOCAB, "dropout": 0.0}, "marian"),
    "GPT-2": (SPECS / "gpt2.yaml", {"dropout": 0.0}, "gpt2"),
}


def our_decoder(name: str, reference: torch.nn.Module, precision_name: str = "float32") -> decode.Decoder:
    """Our model with the reference's (float32) weights, then cast by builder.precision as `--precision` does."""
    spec, overrides, family = OURS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = builder.build(spec, overrides=overrides).eval()
    _copy(family, reference, ours)
    precision.apply(ours, precision_name)
    roles = find_roles(ours.typed_graph.graph)
    if name == "GPT-2":  # as `suppress_tokens`: both run every step
        return decode.Decoder(ours, roles, specials=decode.Specials(never=(PAD_ID, BOS_ID, EOS_ID)))
    return decode.Decoder(ours, roles)


def reference_in(reference: torch.nn.Module, precision_name: str) -> torch.nn.Module | str:
    """The reference in `precision_name` (a copy), or why torch cannot make it: bfloat16 is a cast, int8 torch's
    dynamic quantization of every `nn.Linear` (deprecated in favour of torchao, which is not a dependency)."""
    if precision_name == "float32":
        return reference
    model = copy.deepcopy(reference)
    if precision_name == "bfloat16":
        return model.to(torch.bfloat16)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        return f"torch's dynamic int8 quantization failed: {exc}"[:160]


def _generate(reference: torch.nn.Module, beam: int, **inputs: torch.Tensor) -> Callable[[], Any]:
    beams = {"length_penalty": 0.0, "early_stopping": False} if beam > 1 else {}  # scores as ours: no penalty
    if isinstance(reference.config, transformers.GPT2Config):  # what our decoder never generates either
        beams["suppress_tokens"] = [PAD_ID, BOS_ID, EOS_ID]

    def run() -> Any:
        with torch.no_grad():
            return reference.generate(
                **inputs, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=beam, do_sample=False,
                return_dict_in_generate=True, **beams,
            )  # fmt: skip

    return run


def _inputs(
    name: str, batch: int, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same batch as Hugging Face's `generate` reads it and as ours: sources, or prompts after bos."""
    tokens = torch.randint(4, VOCAB, (batch, SOURCE), generator=generator)
    if name == "Marian":
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, {"src": tokens}
    with_bos = torch.cat((torch.full((batch, 1), BOS_ID), tokens), dim=1)  # ours reads bos before the prompt
    return {"input_ids": with_bos, "attention_mask": torch.ones_like(with_bos)}, {"prompt": tokens}


def ours_call(decoder: decode.Decoder, beam: int, inputs: dict[str, Any]) -> Callable[[], Tokens]:
    """Our decoding of the batch: the best hypothesis' tokens per sentence."""

    def run() -> Tokens:
        if beam == 1:
            return [h.tokens for h in decode.greedy(decoder, **inputs, max_len=NEW)]
        return [found[0].tokens for found in decode.beam_search(decoder, **inputs, beam=beam, max_len=NEW)]

    return run


def _our_cache_bytes(decoder: decode.Decoder, beam: int, inputs: dict[str, Any], batch: int) -> int:
    """Bytes of the step caches when the search holds the most rows (batch × beam), laid out as beam search lays
    them (each source's memory keys and values shared by its hypotheses), allocated for every step."""
    begin = decoder.begin(inputs.get("prompt"), batch)
    state = decoder.start(inputs.get("src"), None, begin.size(1) + NEW)
    with torch.no_grad():
        decoder.next_log_probs(state, begin)
    state.reorder(torch.arange(batch).repeat_interleave(beam))
    return state.cache_bytes()


def same(a: Tokens, b: Tokens) -> int:
    """How many sentences got the very same tokens."""
    return sum(x == y for x, y in zip(a, b, strict=True))


def precision_rows(
    what: str, theirs: str, times: dict[str, Timing], tokens: dict[str, Tokens], target: float, note: str = ""
) -> list[Row]:
    """float32 against float32, then the reference's fastest precision against each of our others (the target
    holds on our fastest's row). Contenders are named '<side> <precision>'; ours are 'blockgraph …'."""
    ours = [n for n in times if n.startswith("blockgraph ")]
    their_names = [n for n in times if n.startswith(f"{theirs} ")]
    fastest_theirs = min(their_names, key=lambda n: times[n].median)
    fastest_ours = min(ours, key=lambda n: times[n].median)
    ours_f32, theirs_f32 = "blockgraph float32", f"{theirs} float32"
    batch = len(tokens[ours_f32])
    agree = same(tokens[theirs_f32], tokens[ours_f32])
    rate = batch * NEW / times[ours_f32].median
    rows = [row(what, theirs_f32, ours_f32, times, target, f"{rate:.0f} tokens/s; same tokens {agree}/{batch}{note}")]
    others = ", ".join(f"{n} {times[n].median * 1e3:.0f} ms" for n in their_names if n != fastest_theirs)
    for name in ours:
        fastest = name == fastest_ours
        if name == ours_f32 and (not fastest or fastest_theirs == theirs_f32):
            continue
        note = (
            f"{batch * NEW / times[name].median:.0f} tokens/s; "
            f"same tokens {same(tokens[fastest_theirs], tokens[name])}/{batch}; as its float32: "
            f"{theirs} {same(tokens[fastest_theirs], tokens[theirs_f32])}/{batch}, "
            f"blockgraph {same(tokens[name], tokens[ours_f32])}/{batch}"
        )
        if not fastest:
            rows.append(row(what, fastest_theirs, name, times, None, note))
            continue
        note += f"; other: {others}" if others else ""
        rows.append(row(f"{what}, each side's fastest", fastest_theirs, name, times, target, note))
    return rows


def decoding_case(cfg: Config) -> list[Row]:
    """Tokens per second of Hugging Face's `generate` and ours, greedy and beam 4, in each side's precisions."""
    rows = []
    generator = torch.Generator().manual_seed(1)
    repeats = 2 if cfg.quick else 3
    for name, make in REFERENCES.items():
        reference = make()
        variants = {p: reference_in(reference, p) for p in PRECISIONS}
        references = {f"generate {p}": m for p, m in variants.items() if not isinstance(m, str)}
        decoders = {f"blockgraph {p}": our_decoder(name, reference, p) for p in PRECISIONS}
        failed = "".join(f"; generate {p}: {m}" for p, m in variants.items() if isinstance(m, str))
        for batch in BATCHES[name]:
            hf_inputs, inputs = _inputs(name, batch, generator)
            for beam in (1, 4):
                search = "greedy" if beam == 1 else f"beam {beam}"
                what = f"decoding {name} {search} ({dims(name, batch)})"
                rows += _search_rows(what, references, decoders, beam, hf_inputs, inputs, repeats, failed)
            if name == "Marian" and batch == BATCHES[name][0]:
                rows.append(_compiled_row(decoders["blockgraph float32"], inputs, batch, repeats))
    return rows


def _search_rows(
    what: str,
    references: dict[str, torch.nn.Module],
    decoders: dict[str, decode.Decoder],
    beam: int,
    hf_inputs: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    repeats: int,
    failed: str,
) -> list[Row]:
    """One interleaved comparison of every precision of both sides; the first untimed call of each is the
    warm-up and gives its tokens (and float32's cache sizes)."""
    batch = len(next(iter(inputs.values())))
    calls: dict[str, Callable[[], Any]] = {n: _generate(m, beam, **hf_inputs) for n, m in references.items()}
    calls |= {n: ours_call(d, beam, inputs) for n, d in decoders.items()}
    tokens: dict[str, Tokens] = {}
    hf_cache = 0
    for name, call in calls.items():
        out = call()
        if name.startswith("generate"):
            tokens[name] = [tuple(t) for t in out.sequences[:, -NEW:].tolist()]
            hf_cache = _hf_cache_bytes(out.past_key_values) if name == "generate float32" else hf_cache
        else:
            tokens[name] = out
    times = compare(calls, warmup=0, repeats=repeats)
    cache = _our_cache_bytes(decoders["blockgraph float32"], beam, inputs, batch) / 2**20
    note = f"; cache {cache:.1f} MiB vs {hf_cache / 2**20:.1f} MiB; {repeats} rounds{failed}"
    return precision_rows(what, "generate", times, tokens, TARGET, note)


def _compiled_row(decoder: decode.Decoder, inputs: dict[str, Any], batch: int, repeats: int) -> Row:
    """The same greedy decoding with the step run through torch.compile (`--compile`)."""
    what = f"decoding Marian greedy, torch.compile'd step ({dims('Marian', batch)})"
    reason = compiler_unavailable()
    if reason:
        return Row(what, "eager step", "compiled step", skipped=reason)
    compiled = decode.Decoder(decoder.model, decoder.roles, compiled=True)
    start = time.perf_counter()
    first = ours_call(compiled, 1, inputs)()
    compile_s = time.perf_counter() - start
    agree = same(ours_call(decoder, 1, inputs)(), first)
    calls = {"eager step": ours_call(decoder, 1, inputs), "compiled step": ours_call(compiled, 1, inputs)}
    times = compare(calls, warmup=1, repeats=repeats)
    note = f"first batch (compiling) {compile_s:.0f} s; same tokens {agree}/{batch}"
    return row(what, "eager step", "compiled step", times, None, note)

"""Decoding speed against Hugging Face `generate`: the same model, weight for weight, the same number of steps.

Marian (specs/marian_zh_en.yaml: 6 + 6 layers, d_model 512) translates a batch of 8 sources of 32 tokens, and
GPT-2 (specs/gpt2.yaml, 124M) continues 8 prompts of 32 tokens, by 40 new tokens each, greedily and with a beam
of 4. Both sides are built with random weights; the reference's are copied into the spec through the family's
table in builder/hf_mappings.py, and each row says how many sentences got the very same tokens from both.
Marian's fixed output bias keeps eos, pad and bos out of reach (−10⁴), and GPT-2 suppresses them on both
sides, so both run all 40 steps (`generate` gets `min_new_tokens` = `max_new_tokens` as well). The ratio is
our tokens per second over the reference's (its time / ours). A last row times `--compile`'s step against
the eager one, on Marian greedily.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks.cases import Config, Row, compiler_unavailable, row
from benchmarks.timing import compare
from blockgraph import builder
from blockgraph.builder.families import FAMILIES
from blockgraph.builder.hf_mappings import convert
from blockgraph.builder.persist import unique_tensors
from blockgraph.trainer import decode
from blockgraph.trainer.roles import find_roles
from blockgraph.trainer.vocab import BOS_ID, EOS_ID, PAD_ID

SPECS = Path(__file__).resolve().parent.parent / "specs"
BATCH, SOURCE, NEW, VOCAB = 8, 32, 40, 8000
DIMS = {
    "Marian": f"6+6 layers, d_model 512, vocab {VOCAB}, batch {BATCH}, source {SOURCE}, {NEW} new",
    "GPT-2": f"124M, batch {BATCH}, prompt {SOURCE}, {NEW} new",
}


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


def marian_models() -> tuple[torch.nn.Module, decode.Decoder]:
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = builder.build(f"{SPECS}/marian_zh_en.yaml", overrides={"vocab": VOCAB, "dropout": 0.0}).eval()
    _copy("marian", reference, ours)
    return reference, decode.Decoder(ours, find_roles(ours.typed_graph.graph))


def gpt2_models() -> tuple[torch.nn.Module, decode.Decoder]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    reference = transformers.GPT2LMHeadModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = builder.build(f"{SPECS}/gpt2.yaml", overrides={"dropout": 0.0}).eval()
    _copy("gpt2", reference, ours)
    never = decode.Specials(never=(PAD_ID, BOS_ID, EOS_ID))  # as `suppress_tokens`: both run every step
    return reference, decode.Decoder(ours, find_roles(ours.typed_graph.graph), specials=never)


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


def _inputs(name: str, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same batch as Hugging Face's `generate` reads it and as ours: sources, or prompts after bos."""
    tokens = torch.randint(4, VOCAB, (BATCH, SOURCE), generator=generator)
    if name == "Marian":
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, {"src": tokens}
    with_bos = torch.cat((torch.full((BATCH, 1), BOS_ID), tokens), dim=1)  # ours reads bos before the prompt
    return {"input_ids": with_bos, "attention_mask": torch.ones_like(with_bos)}, {"prompt": tokens}


def _ours(decoder: decode.Decoder, beam: int, inputs: dict[str, Any]) -> Callable[[], list[tuple[int, ...]]]:
    """Our decoding of the batch: the best hypothesis' tokens per sentence."""

    def run() -> list[tuple[int, ...]]:
        if beam == 1:
            return [h.tokens for h in decode.greedy(decoder, **inputs, max_len=NEW)]
        return [found[0].tokens for found in decode.beam_search(decoder, **inputs, beam=beam, max_len=NEW)]

    return run


def _our_cache_bytes(decoder: decode.Decoder, beam: int, inputs: dict[str, Any]) -> int:
    """Bytes of the step caches when the search holds the most rows (batch × beam), allocated for every step."""
    rows = BATCH * beam
    src, prompt = inputs.get("src"), inputs.get("prompt")
    begin = torch.full((rows, 1), BOS_ID, dtype=torch.long)
    if prompt is not None:
        begin = torch.cat((begin, prompt.repeat_interleave(beam, 0)), dim=1)
    state = decoder.start(None if src is None else src.repeat_interleave(beam, 0), None, begin.size(1) + NEW)
    with torch.no_grad():
        decoder.next_log_probs(state, begin)
    return state.cache_bytes()


def decoding_case(cfg: Config) -> list[Row]:
    """Tokens per second of Hugging Face's `generate` and ours, greedy and beam 4, with the caches' sizes."""
    rows = []
    generator = torch.Generator().manual_seed(1)
    repeats = 2 if cfg.quick else 3
    for name, models in (("Marian", marian_models), ("GPT-2", gpt2_models)):
        reference, decoder = models()
        hf_inputs, inputs = _inputs(name, generator)
        for beam in (1, 4):
            hf, ours = _generate(reference, beam, **hf_inputs), _ours(decoder, beam, inputs)
            expected = [tuple(t) for t in hf().sequences[:, -NEW:].tolist()]
            same = sum(a == b for a, b in zip(expected, ours(), strict=True))
            times = compare({"generate": hf, "blockgraph": ours}, warmup=1, repeats=repeats)
            cache = _our_cache_bytes(decoder, beam, inputs) / 2**20
            hf_cache = _hf_cache_bytes(hf().past_key_values) / 2**20
            search = "greedy" if beam == 1 else f"beam {beam}"
            rate = BATCH * NEW / times["blockgraph"].median
            note = (
                f"{rate:.0f} tokens/s; same tokens {same}/{BATCH}; cache {cache:.1f} MiB vs {hf_cache:.1f} MiB; "
                f"goal ≥ 1.5; {repeats} rounds"
            )
            rows.append(row(f"decoding {name} {search} ({DIMS[name]})", "generate", "blockgraph", times, 1.0, note))
        if name == "Marian":
            rows.append(_compiled_row(decoder, inputs, repeats))
    return rows


def _compiled_row(decoder: decode.Decoder, inputs: dict[str, Any], repeats: int) -> Row:
    """The same greedy decoding with the step run through torch.compile (`--compile`)."""
    what = f"decoding Marian greedy, torch.compile'd step ({DIMS['Marian']})"
    reason = compiler_unavailable()
    if reason:
        return Row(what, "eager step", "compiled step", skipped=reason)
    compiled = decode.Decoder(decoder.model, decoder.roles, compiled=True)
    start = time.perf_counter()
    first = _ours(compiled, 1, inputs)()
    compile_s = time.perf_counter() - start
    same = sum(a == b for a, b in zip(_ours(decoder, 1, inputs)(), first, strict=True))
    calls = {"eager step": _ours(decoder, 1, inputs), "compiled step": _ours(compiled, 1, inputs)}
    times = compare(calls, warmup=1, repeats=repeats)
    note = f"first batch (compiling) {compile_s:.0f} s; same tokens {same}/{BATCH}"
    return row(what, "eager step", "compiled step", times, None, note)

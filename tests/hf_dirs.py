"""Hugging Face-format directories made here, with their tokenizers: a Marian model around a SentencePiece model
trained on the shipped zh sentences, and a GPT-2 with a word-level tokenizer.json (nothing is downloaded)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from conftest import SPECS, redraw

SEQ = {"max_position_embeddings": 32, "d_model": 24, "encoder_layers": 2, "decoder_layers": 2}
HEADS = {"encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 40, "decoder_ffn_dim": 40}
DROPOUTS = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


def sentences(side: int) -> list[str]:
    """One side of specs/data/zh_en.tsv: 0 the Chinese, 1 the English."""
    lines = (SPECS / "data" / "zh_en.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[side] for line in lines]


def marian(root: Path, **settings: Any) -> tuple[transformers.MarianMTModel, Any, Path]:
    """A random-weight Marian directory at root/hf with source.spm = target.spm (trained on the zh sentences)
    and vocab.json: (the model, its MarianTokenizer, the directory)."""
    import sentencepiece

    text = root / "zh.txt"
    text.write_text("\n".join(sentences(0)) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(root / "spm"), vocab_size=600, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    processor = sentencepiece.SentencePieceProcessor(model_file=str(root / "spm.model"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    tokens = ["</s>", "<unk>", *(p for p in pieces if p not in ("<unk>", "<s>", "</s>")), "<pad>"]
    hf = root / "hf"
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=len(tokens), decoder_vocab_size=len(tokens), pad_token_id=len(tokens) - 1,
        decoder_start_token_id=len(tokens) - 1, eos_token_id=0, activation_function="swish",
        scale_embedding=True, **{**SEQ, **HEADS, **DROPOUTS, **settings},
    )  # fmt: skip
    reference = transformers.MarianMTModel(config).eval()
    redraw(reference, seed=2)
    reference.save_pretrained(hf)
    for name in ("source.spm", "target.spm"):
        shutil.copyfile(root / "spm.model", hf / name)
    (hf / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    with warnings.catch_warnings():  # it recommends sacremoses, which only its punctuation normalizer uses
        warnings.simplefilter("ignore")
        tokenizer = transformers.MarianTokenizer(
            source_spm=str(hf / "source.spm"), target_spm=str(hf / "target.spm"), vocab=str(hf / "vocab.json")
        )
    return reference, tokenizer, hf


def gpt2(root: Path, **settings: Any) -> tuple[transformers.GPT2LMHeadModel, Any, Path]:
    """A random-weight GPT-2 directory at root/hf with a word-level tokenizer.json of the English sentences:
    (the model, its `tokenizers.Tokenizer`, the directory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for s in sentences(1) for w in s.replace(".", " .").split()})
    vocab = {w: i for i, w in enumerate(["<unk>", *words, "<|endoftext|>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = root / "hf"
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=32, n_embd=24, n_layer=2, n_head=4, bos_token_id=eos, eos_token_id=eos,
        **settings,
    )  # fmt: skip
    reference = transformers.GPT2LMHeadModel(config).eval()
    redraw(reference, seed=3)
    reference.save_pretrained(hf)
    tokenizer.save(str(hf / "tokenizer.json"))
    return reference, tokenizer, hf

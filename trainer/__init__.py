"""Training and decoding for blockgraph models: `blockgraph train`, `translate`, `generate` and `import`.

One job per module:

- `vocab`: tokenizers (Chinese characters, English words, whitespace) and vocabularies with special tokens;
- `subword`: SentencePiece tokenizers learned from the data or given as a file, named by their content;
- `data`: reading tab-separated pairs or a text file (located errors, `--skip-bad-lines`) and splitting them;
- `tasks`: synthetic copy/reverse tasks that need no data;
- `roles`: which spec input is the source, the target, their padding masks, and which output the log-probs;
- `batching`: length-bucketed, padded batches, sharded over distributed ranks;
- `schedule`: the Transformer learning-rate schedule and Adam;
- `losses`: the label-smoothed cross-entropy, accuracy, and the objective with the spec's declared loss outputs;
- `loop`: a training run (`Run`) with progress, evaluation and checkpoints;
- `checkpoint`: atomic checkpoint directories (weights, spec, vocabularies, optimizer and RNG state);
- `model_path`: what a path given for a model holds (a spec file, a saved model, a run or checkpoint, an import),
  resolved one way for every command;
- `decode`: batched greedy, beam search and sampling over the model's step program; `bleu`: corpus BLEU and
  chrF (sacrebleu);
- `generation`: text in, hypotheses out, batch by batch (`Translator`);
- `pretrained`: models imported from Hugging Face-format directories, with their tokenizers;
- `distributed`: DistributedDataParallel set-up and the launcher that starts and supervises `--nproc` workers;
- `commands`: the Typer command functions `train`, `translate`, `generate` and `import`.
"""

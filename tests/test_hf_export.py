"""`blockgraph export --format hf`: every family imported from a directory `save_pretrained` wrote (small configs,
nothing downloaded) goes back out as a directory `transformers` loads with its Auto class, holding HF's own tensor
names and computing the original's outputs to 1e-5 on padded inputs; an edited and fine-tuned import goes out
with its edits; what the family's config.json cannot express is refused by node; a plugin family is a built-in's
equal."""

from __future__ import annotations

import json
from pathlib import Path

import hf_dirs
import pytest
import torch
import transformers
import yaml
from conftest import ROOT
from safetensors import safe_open
from test_import import MODELS, _padded, _saved, reference_outputs

from blockgraph.builder import hf_export
from blockgraph.builder.families import FAMILIES, docs_table
from blockgraph.builder.hf_import import spec_variables
from blockgraph.common.errors import Location
from blockgraph.trainer import pretrained

torch.set_num_threads(1)


def _names(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("model_type", list(MODELS))
def test_an_import_goes_back_out_as_transformers_loads_it(tmp_path, run_cli, model_type):
    reference = _saved(model_type, tmp_path / "hf")
    pretrained.import_pretrained(tmp_path / "hf", tmp_path / "out")
    result = run_cli("export", tmp_path / "out", "--format", "hf", "--out", tmp_path / "back")
    assert result.code == 0, result.stderr
    assert "no tokenizer files went along" in result.stderr
    back = tmp_path / "back"
    family = FAMILIES[model_type]
    expected = {"config.json", "model.safetensors"} | (
        {"generation_config.json"} if family.task != "encoder" else set()
    )
    assert {p.name for p in back.iterdir()} == expected
    assert _names(back) == _names(tmp_path / "hf")  # HF's tensor names, tied ones left out as it leaves them
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == list(family.architectures) and "auto_map" not in config
    loaded = getattr(transformers, family.auto_class).from_pretrained(back).eval()
    assert type(loaded) is type(reference)
    (got, keep), (want, _) = reference_outputs(loaded, model_type), reference_outputs(reference, model_type)
    assert (got - want).abs()[keep].max().item() <= 1e-5


def test_every_family_reads_back_the_config_it_writes():
    """The registry's families are whole: a spec, a reading both ways, a table both ways, a docs row."""
    docs = Path(__file__).parent.parent / "docs"
    for page in ("models.md", "pretrained.md"):
        assert docs_table() in (docs / page).read_text(), page
    for family in FAMILIES.values():
        assert family.spec_path.is_file() and family.architectures and family.sizes
        ours = hf_export.typed_graph(family.spec_path).graph.vars
        variables = {key: ours[key] for key in family.variables}
        config = hf_export.hf_config(family, variables, {})
        assert spec_variables(family, config, Location()) == variables, family.model_type
        assert {rule.hf for rule in family.rules} and all(
            rule.ours or rule.transform == "tied" for rule in family.rules
        )


def test_an_edited_fine_tuned_marian_goes_out_and_translates_as_blockgraph_does(tmp_path, run_cli):
    """import → --set a smaller depth → fine-tune → export → AutoModelForSeq2SeqLM: the same logits and greedy
    tokens as blockgraph's for the fine-tuned weights, and the tokenizer files along."""
    _, tokenizer, hf = hf_dirs.marian(tmp_path)
    assert run_cli("import", hf, "--out", tmp_path / "out").code == 0
    pairs = list(zip(hf_dirs.sentences(0), hf_dirs.sentences(1), strict=True))[:8]
    (tmp_path / "train.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    trained = run_cli(
        "train", tmp_path / "out", "--data", tmp_path / "train.tsv", "--valid-fraction", "0", "--max-steps", "3",
        "--lr", "1e-3", "--warmup", "1", "--batch-size", "4", "--bleu-sentences", "0", "--set", "dec_layers=1",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert trained.code == 0, trained.stderr
    result = run_cli("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "back")
    assert result.code == 0, result.stderr
    back = tmp_path / "back"
    assert {p.name for p in back.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "source.spm", "target.spm", "vocab.json"
    }  # fmt: skip
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(back).eval()
    assert loaded.config.decoder_layers == 1 and loaded.config.encoder_layers == 2
    ours = pretrained.load_model(tmp_path / "run" / "checkpoint")
    src, src_pad = _padded(3, 8, loaded.config.vocab_size, seed=4)
    tgt, tgt_pad = _padded(3, 6, loaded.config.vocab_size, seed=5)
    with torch.no_grad():
        want = ours.model(src=src, tgt=tgt, src_pad=src_pad, tgt_pad=tgt_pad)
        got = loaded(
            input_ids=src, attention_mask=(~src_pad).long(), decoder_input_ids=tgt,
            decoder_attention_mask=(~tgt_pad).long(),
        ).logits  # fmt: skip
    assert (got - want).abs()[~tgt_pad].max().item() <= 1e-5
    sentence = hf_dirs.sentences(0)[0]
    translated = run_cli("translate", tmp_path / "run", sentence, "--max-len", "8")
    assert translated.code == 0, translated.stderr
    ids = tokenizer(sentence, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = loaded.generate(
            input_ids=ids, max_new_tokens=8, do_sample=False, num_beams=1,
            suppress_tokens=[loaded.config.pad_token_id], forced_eos_token_id=None,
        )  # fmt: skip
    assert translated.stdout.strip() == tokenizer.decode(generated[0], skip_special_tokens=True).strip()


def test_what_the_config_cannot_express_is_refused_at_its_node(tmp_path, run_cli):
    _saved("marian", tmp_path / "hf")
    pretrained.import_pretrained(tmp_path / "hf", tmp_path / "out")
    spec = tmp_path / "out" / "spec.yaml"
    spec.write_text(spec.read_text().replace("activation: silu", "activation: relu"))
    result = run_cli("export", spec, "--format", "hf", "--out", tmp_path / "back")
    assert result.code == 1 and "Traceback" not in result.stderr
    assert "node decoder.0: activation 'relu'; marian's config.json says 'silu'" in result.stderr
    assert "node encoder.1: activation 'relu'" in result.stderr and not (tmp_path / "back").exists()


def test_a_spec_outside_every_family_is_refused_with_the_other_formats(tmp_path, run_cli):
    spec = Path(__file__).parent.parent / "specs" / "tiny_encoder.yaml"
    result = run_cli("export", spec, "--format", "hf", "--out", tmp_path / "back")
    assert result.code == 1 and "none of the registered families" in result.stderr
    assert "--format exported-program" in result.stderr and not (tmp_path / "back").exists()


def test_a_spec_of_a_family_exports_with_its_sizes(tmp_path, run_cli):
    spec = Path(__file__).parent.parent / "specs" / "mistral.yaml"
    sizes = ("--set", "d_model=32", "--set", "heads=4", "--set", "kv_heads=2", "--set", "d_ff=44", "--set", "layers=1",
             "--set", "vocab=50", "--set", "window=3")  # fmt: skip
    result = run_cli("export", spec, *sizes, "--format", "hf", "--out", tmp_path / "back")
    assert result.code == 0, result.stderr
    config = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert config.model_type == "mistral" and config.sliding_window == 3 and config.num_key_value_heads == 2


PLUGIN = """
import dataclasses

from blockgraph.builder.families import FAMILIES, register

register(dataclasses.replace(FAMILIES["gpt2"], model_type="house_gpt", architectures=("HouseGPT",)))
"""


def test_a_plugin_family_imports_and_exports_as_a_built_in_does(tmp_path, run_cli):
    from safetensors.torch import load_file

    _saved("gpt2", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "house_gpt"}))
    (tmp_path / "house.py").write_text(PLUGIN)
    plugin = ("--plugin", tmp_path / "house.py")
    try:
        imported = run_cli("import", tmp_path / "hf", "--out", tmp_path / "out", *plugin)
        assert imported.code == 0 and "imported house_gpt" in imported.stderr, imported.stderr
        exported = run_cli("export", tmp_path / "out", "--format", "hf", "--out", tmp_path / "back", *plugin)
        assert exported.code == 0, exported.stderr
    finally:
        FAMILIES.pop("house_gpt", None)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["model_type"] == "house_gpt" and back["architectures"] == ["HouseGPT"]
    original, written = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)


def test_a_small_shard_size_writes_shards_that_transformers_and_import_read(tmp_path, run_cli):
    """--max-shard-size 20KB splits the tiny gpt2 (about 70KB) into shards with an index, as save_pretrained does."""
    from safetensors.torch import load_file

    from blockgraph.builder import persist

    reference = _saved("gpt2", tmp_path / "hf")
    pretrained.import_pretrained(tmp_path / "hf", tmp_path / "out")
    back = tmp_path / "back"
    result = run_cli("export", tmp_path / "out", "--format", "hf", "--max-shard-size", "20KB", "--out", back)
    assert result.code == 0, result.stderr
    shards = sorted(p.name for p in back.glob("model-*.safetensors"))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and not (back / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards and set(index["weight_map"]) == _names(tmp_path / "hf")
    for shard in shards:
        sizes = [t.numel() * t.element_size() for t in load_file(back / shard).values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1, shard
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    (got, keep), (want, _) = reference_outputs(loaded, "gpt2"), reference_outputs(reference, "gpt2")
    assert torch.equal(got[keep], want[keep])
    again = run_cli("import", back, "--out", tmp_path / "again")
    assert again.code == 0, again.stderr
    ours, theirs = persist.load(tmp_path / "out" / "model"), persist.load(tmp_path / "again" / "model")
    assert all(torch.equal(t, theirs.state_dict()[k]) for k, t in ours.state_dict().items())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hf", "5XB"), "--max-shard-size '5XB': a size from 1KB to 1TB"),
        (("hf", "999B"), "--max-shard-size '999B': a size from 1KB to 1TB"),
        (("hf", "2TB"), "--max-shard-size '2TB': a size from 1KB to 1TB"),
        (("onnx", "1GB"), "--format onnx is one file"),
    ],
)
def test_a_shard_size_out_of_bounds_or_without_hf_is_refused(tmp_path, run_cli, args, message):
    spec = Path(__file__).parent.parent / "specs" / "gpt2.yaml"
    result = run_cli("export", spec, "--format", args[0], "--max-shard-size", args[1], "--out", tmp_path / "back")
    assert result.code == 1 and "Traceback" not in result.stderr and message in result.stderr, result.stderr
    assert not (tmp_path / "back").exists()


OVERRIDE = """
import dataclasses

from blockgraph.builder.families import FAMILIES, register

register(dataclasses.replace(FAMILIES["gpt2"], architectures=("HouseGPT2LMHeadModel",)))
"""


def test_a_plugin_family_takes_a_built_in_model_type_only_with_allow_override(tmp_path, run_cli):
    (tmp_path / "house.py").write_text(OVERRIDE)
    spec = Path(__file__).parent.parent / "specs" / "gpt2.yaml"
    sizes = ("--set", "vocab=50", "--set", "max_len=16", "--set", "d_model=16", "--set", "heads=2",
             "--set", "layers=1")  # fmt: skip
    export = ("export", spec, *sizes, "--format", "hf", "--plugin", tmp_path / "house.py")
    built_in = FAMILIES["gpt2"]
    try:
        refused = run_cli(*export, "--out", tmp_path / "refused")
        assert refused.code == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "plugin house.py: model_type 'gpt2' is already taken" in refused.stderr
        assert "--allow-override" in refused.stderr and FAMILIES["gpt2"] is built_in
        accepted = run_cli(*export, "--allow-override", "--out", tmp_path / "back")
        assert accepted.code == 0, accepted.stderr
    finally:
        FAMILIES["gpt2"] = built_in
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["HouseGPT2LMHeadModel"]


def test_a_plugin_family_whose_spec_has_no_vars_block_is_a_located_error(tmp_path, run_cli):
    """The import writes the config's sizes into the spec's `vars:` block, one a line: a plugin family's spec
    that writes them in flow style is refused naming its file, never with a traceback."""
    spec = yaml.safe_load((ROOT / "specs" / "gpt2.yaml").read_text())
    flow = tmp_path / "flow_gpt.yaml"
    flow.write_text(yaml.safe_dump(spec, default_flow_style=None, sort_keys=False))
    assert "\nvars: {" in flow.read_text()
    _saved("gpt2", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "flow_gpt"}))
    (tmp_path / "flow.py").write_text(
        "import dataclasses\nfrom pathlib import Path\n\n"
        "from blockgraph.builder.families import FAMILIES, register\n\n"
        "register(dataclasses.replace(FAMILIES['gpt2'], model_type='flow_gpt', "
        f"spec=Path({str(flow)!r})))\n"
    )
    try:
        imported = run_cli("--plugin", tmp_path / "flow.py", "import", tmp_path / "hf", "--out", tmp_path / "out")
    finally:
        FAMILIES.pop("flow_gpt", None)
    message = " ".join(imported.stderr.split())
    assert imported.code == 1 and imported.exception is None, imported.stderr
    assert "has no top-level `vars:` block" in message and "flow_gpt.yaml" in message, message

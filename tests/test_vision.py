"""Images in: the vision blocks against transformers' ViT embeddings (positions resized at other image sizes), the
`vit` family imported from a directory `save_pretrained` wrote (small config, weights redrawn, nothing downloaded)
and exported back, its FLOPs against the closed form, and exports dynamic in batch and image size."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SPECS, redraw
from rich.console import Console
from safetensors import safe_open

from blockgraph import builder
from blockgraph.blocks.vision import PatchEmbedding, PatchPosition, PrependTokens
from blockgraph.builder import export as exporting
from blockgraph.builder import hf_export, persist, precision, trial, views
from blockgraph.builder.analysis import analyse
from blockgraph.builder.model import GraphModel
from blockgraph.builder.pipeline import compile_graph, typed_graph
from blockgraph.builder.shapes import TypedGraph
from blockgraph.common.errors import CheckpointError, SpecError
from blockgraph.trainer import pretrained

torch.set_num_threads(1)

VIT = SPECS / "vit.yaml"
SMALL = {"image_size": 32, "patch": 8, "d_model": 16, "heads": 2, "d_ff": 24, "layers": 1, "labels": 5}
# (batch, height, width): the trained 32 × 32 (a 4 × 4 grid) and others, square or not, larger and smaller
SIZES = [(2, 32, 32), (3, 48, 40), (1, 24, 64)]


def small_config(**changes: object) -> transformers.ViTConfig:
    settings = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
                "image_size": 32, "patch_size": 8, "num_labels": 5, **changes}  # fmt: skip
    return transformers.ViTConfig(**settings)


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- the blocks -------------------------------------------------------------------------------------------------


def test_the_blocks_compute_transformers_vit_embeddings_at_any_image_size():
    """patch_embedding → prepend_tokens → patch_position equals ViTEmbeddings with interpolate_pos_encoding=True:
    at the trained grid, and resized bicubically to other grids (square or not, larger or smaller)."""
    reference = transformers.models.vit.modeling_vit.ViTEmbeddings(small_config()).eval()
    redraw(reference, seed=4)
    patches = PatchEmbedding(PatchEmbedding.Params(channels=3, dim=16, patch=8))
    cls = PrependTokens(PrependTokens.Params(dim=16))
    positions = PatchPosition(PatchPosition.Params(dim=16, grid=4, patch=8, prefix=1))
    with torch.no_grad():
        patches.projection.load_state_dict(reference.patch_embeddings.projection.state_dict())
        cls.tokens.copy_(reference.cls_token[0])
        positions.pe.copy_(reference.position_embeddings[0])
        for batch, height, width in [*SIZES, (2, 16, 16)]:
            image = images(batch, height, width)
            want = reference(image, interpolate_pos_encoding=True)
            got = positions(cls(patches(image)), image)
            assert got.shape == (batch, 1 + (height // 8) * (width // 8), 16)
            assert (got - want).abs().max().item() <= 1e-5, (height, width)
        trained = images(2, 32, 32)
        assert torch.equal(positions(cls(patches(trained))), positions(cls(patches(trained)), trained))


def test_a_cropping_patch_embedding_drops_the_pixels_a_strided_convolution_drops():
    reference = transformers.models.vit.modeling_vit.ViTEmbeddings(small_config()).eval()
    redraw(reference, seed=5)
    patches = PatchEmbedding(PatchEmbedding.Params(dim=16, patch=8, crop=True))
    positions = PatchPosition(PatchPosition.Params(dim=16, grid=4, patch=8))
    cls = PrependTokens(PrependTokens.Params(dim=16))
    with torch.no_grad():
        patches.projection.load_state_dict(reference.patch_embeddings.projection.state_dict())
        cls.tokens.copy_(reference.cls_token[0])
        positions.pe.copy_(reference.position_embeddings[0])
        image = images(2, 45, 39)  # a 5 × 4 grid, 5 and 7 pixels left over
        got = positions(cls(patches(image)), image)
        assert (got - reference(image, interpolate_pos_encoding=True)).abs().max().item() <= 1e-5


def test_tokens_go_first_or_after_the_first_positions():
    x = torch.randn(2, 5, 4)
    first = PrependTokens(PrependTokens.Params(dim=4, count=2))
    after = PrependTokens(PrependTokens.Params(dim=4, count=3, after=1))
    y, z = first(x), after(x)
    assert torch.equal(y[:, 2:], x) and torch.equal(y[0, :2], first.tokens) and torch.equal(y[1, :2], first.tokens)
    assert torch.equal(z[:, :1], x[:, :1]) and torch.equal(z[:, 4:], x[:, 1:]) and torch.equal(z[1, 1:4], after.tokens)


def _patch_spec(shape: list) -> dict:
    return {
        "name": "patches",
        "dims": {"batch": 2, "height": 36, "width": 32},
        "inputs": {"image": {"dtype": "float32", "shape": shape}},
        "nodes": {"embed": {"type": "patch_embedding", "params": {"dim": 8, "patch": 8}, "in": "image"}},
        "outputs": "embed",
    }


def test_an_image_size_that_is_no_multiple_of_the_patch_is_refused_at_the_node():
    with pytest.raises(SpecError) as known:  # a size the spec fixes: refused by the shape rule
        typed_graph(_patch_spec(["batch", 3, 36, 32]))
    assert "image height 36 is not a multiple of the patch size 8" in str(known.value)
    assert known.value.problems[0].node == "embed" and "crop: true" in str(known.value.problems[0].hint)
    typed = typed_graph(_patch_spec(["batch", 3, "height", "width"]))  # a named size: refused when it is known
    model = compile_graph(typed)
    dims = trial.resolve_dims(typed.graph)
    with pytest.raises(SpecError, match=r"block 'patch_embedding'.*image height 36 is not a multiple of the patch"):
        trial.trial_run(model, trial.dummy_inputs(typed.graph, dims), dims)
    with pytest.raises(SpecError, match="has 4 channels, but channels is 3"):
        typed_graph(_patch_spec(["batch", 4, "height", "width"]))


# --- the vit family: import, outputs, export back -------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[transformers.ViTForImageClassification, Path, Path]:
    """A small ViTForImageClassification written by save_pretrained and imported: (reference, hf dir, import)."""
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    reference = transformers.ViTForImageClassification(small_config()).eval()
    redraw(reference, seed=1)
    reference.save_pretrained(root / "hf")
    report = pretrained.import_pretrained(root / "hf", root / "out")
    assert report.model_type == "vit" and report.tokenizer is None
    return reference, root / "hf", root / "out"


def test_the_import_computes_the_logits_and_states_transformers_does(imported):
    """At the trained size and, positions resized, at others (transformers: interpolate_pos_encoding=True)."""
    reference, _, out = imported
    ours = persist.load(out / "model").eval()
    for batch, height, width in SIZES:
        image = images(batch, height, width, seed=height)
        with torch.no_grad():
            want = reference(image, interpolate_pos_encoding=True, output_hidden_states=True)
            got = ours(image=image)
            assert (got["logits"] - want.logits).abs().max().item() <= 1e-5
            states = reference.vit(image, interpolate_pos_encoding=True).last_hidden_state
            assert (got["last_hidden_state"] - states).abs().max().item() <= 1e-5


def test_the_written_spec_holds_the_configs_sizes_and_labels(imported):
    reference, _, out = imported
    variables = builder.load_spec(out / "spec.yaml").spec.vars
    config = reference.config
    assert (variables["d_model"], variables["patch"], variables["image_size"]) == (16, 8, 32)
    assert variables["labels"] == config.num_labels == 5 and variables["layers"] == 2
    record = json.loads((out / "pretrained.json").read_text())
    assert record["tokenizer"] is None and record["specials"] == {}
    with pytest.raises(CheckpointError, match="a vit model classifies images; it does not generate"):
        pretrained.load(out)


def test_the_import_goes_back_out_as_transformers_loads_it(imported, tmp_path):
    reference, hf, out = imported
    notes: list[str] = []
    pretrained.export(persist.load(out / "model"), out, tmp_path / "back", notes.append, max_shard_size=10**9)
    back = tmp_path / "back"
    assert {p.name for p in back.iterdir()} == {"config.json", "model.safetensors"} and not notes
    with safe_open(str(back / "model.safetensors"), "pt") as f, safe_open(str(hf / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())  # transformers' own names, the legacy layout it saves
    loaded = transformers.AutoModelForImageClassification.from_pretrained(back).eval()
    assert type(loaded) is transformers.ViTForImageClassification and loaded.config.num_labels == 5
    image = images(2, 40, 32, seed=7)
    with torch.no_grad():
        got = loaded(image, interpolate_pos_encoding=True).logits
        want = reference(image, interpolate_pos_encoding=True).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_a_variant_the_spec_does_not_implement_is_refused(tmp_path):
    transformers.ViTForImageClassification(small_config(qkv_bias=False)).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="qkv_bias is 'false'; the vit spec implements true"):
        pretrained.import_pretrained(tmp_path / "hf", tmp_path / "out")


@pytest.mark.parametrize(
    ("image_size", "said"),
    [(13, "image_size % patch_size is .5.; the vit spec implements 0"), (3, "smaller than one patch")],
)
def test_an_image_size_no_whole_grid_of_patches_covers_is_refused_at_import(tmp_path, image_size, said):
    """transformers' convolution drops the pixels no patch covers; the spec's grid is image_size / patch."""
    config = small_config()
    config.image_size = image_size
    config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=said):
        pretrained.import_pretrained(tmp_path, tmp_path / "out")


# --- inspect and export -----------------------------------------------------------------------------------------


def test_vit_b16_flops_are_the_closed_form_and_inspect_says_how_they_count():
    """ViT-B/16 at 224 × 224, on meta: 86,567,656 parameters; torch's count, the blocks' formulas and the closed
    form agree (2 FLOPs per multiply-add: 35.13G; the 17.6 "GFLOPs" quoted for it are its 17.56G multiply-adds)."""
    model = builder.build(VIT, device="meta")
    costs = analyse(model.typed_graph, model, {"batch": 1, "height": 224, "width": 224})
    d, f, layers, labels, patches = 768, 3072, 12, 1000, 14 * 14
    seq = patches + 1
    layer = 4 * 2 * seq * d * d + 4 * seq * seq * d + 2 * 2 * seq * d * f  # projections, QKᵀ and AV, feed-forward
    closed = 2 * patches * 3 * 16 * 16 * d + layers * layer + 2 * d * labels
    assert costs.parameters == 86_567_656
    assert costs.flops == costs.flops_analytic == closed == 35_127_656_448
    console = Console(file=io.StringIO(), width=200)
    console.print(views.inspect_totals(model.typed_graph, costs))
    text = console.file.getvalue()
    assert "35.13G forward" in text and "2 FLOPs per multiply-add: 17.56G multiply-adds" in text


def _small_vit() -> tuple[GraphModel, TypedGraph]:
    typed = typed_graph(VIT, SMALL)
    torch.manual_seed(0)
    return compile_graph(typed).eval(), typed


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_the_vision_blocks_run_in_every_decoding_precision(kind):
    """bfloat16 casts the blocks' tables and convolution (float32 pixels are cast on the way in); int8 swaps the
    Linear layers only: both stay near float32 at another image size than trained."""
    model, typed = _small_vit()
    image = images(2, 40, 24, seed=3)
    lowered = compile_graph(typed).eval()
    lowered.load_state_dict(model.state_dict())
    precision.apply(lowered, kind)
    with torch.no_grad():
        want, got = model(image=image)["logits"], lowered(image=image)["logits"]
    assert got.dtype == (torch.bfloat16 if kind == "bfloat16" else torch.float32)
    assert (got.float() - want).abs().max().item() <= 0.05 * want.abs().max().item()


ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime"))


def test_the_export_takes_any_batch_and_image_size(tmp_path):
    """Dynamic batch, height and width (positions resized in the program, heights and widths held to multiples of
    the patch), run at other sizes than traced: through onnxruntime where the ONNX tooling is installed (an ONNX
    export is the exported program converted; one trace is what the test time allows), else the program itself."""
    model, typed = _small_vit()
    path = tmp_path / ("vit.onnx" if ONNX else "vit.pt2")
    result = exporting.export(
        model, typed, trial.resolve_dims(typed.graph), "onnx" if ONNX else "exported-program", path
    )
    assert set(result.dynamic) == {"batch", "height", "width"} and not result.static and not result.warnings
    if ONNX:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [(i.name, i.shape) for i in session.get_inputs()] == [("image", ["batch", 3, "height", "width"])]
        assert [o.name for o in session.get_outputs()] == ["logits", "last_hidden_state"]

        def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
            logits, states = session.run(None, {"image": image.numpy()})
            return {"logits": torch.from_numpy(logits), "last_hidden_state": torch.from_numpy(states)}
    else:
        program = torch.export.load(path).module()

        def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
            return program(image=image)

    for batch, height, width in SIZES:
        image = images(batch, height, width, seed=1)
        with torch.no_grad():
            got, want = run(image), model(image=image)
        for name in ("logits", "last_hidden_state"):
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


def test_hf_export_of_a_vit_spec_at_its_own_sizes(tmp_path):
    """A spec built here (not imported) goes out as a ViTForImageClassification of its sizes."""
    model = builder.build(VIT, overrides=SMALL)
    hf_export.export_hf(model, tmp_path / "back")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert (config.model_type, config.patch_size, config.image_size, config.num_labels) == ("vit", 8, 32, 5)

"""CLIP: a `CLIPModel` from a small config (weights redrawn, `save_pretrained`; nothing downloaded) imports into
specs/clip.yaml and computes its image and text embeddings and image-text logits to 1e-5 on padded texts, also
at an image size other than the trained one (positions resized as transformers does); `export --format hf` gives
back a directory `AutoModel` loads as the same model; the text pooler reads end-of-text as the config says; what
the spec does not implement is refused; the new blocks count their FLOPs as torch does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import SPECS, redraw
from safetensors import safe_open

from blockgraph import builder
from blockgraph.blocks import REGISTRY
from blockgraph.builder import persist, pipeline
from blockgraph.builder.analysis import analyse
from blockgraph.builder.families import FAMILIES
from blockgraph.builder.hf_import import spec_variables
from blockgraph.common.errors import CheckpointError, Location
from blockgraph.trainer import pretrained

torch.set_num_threads(1)

VOCAB = 99
OUTPUTS = ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text")


def _config(**text: Any) -> transformers.CLIPConfig:
    """Text 32 wide, vision 24 wide (32 × 32 images in 8 × 8 patches), both 2 layers of 4 heads, projected to 20."""
    text_config = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 0, "pad_token_id": 1,
        "eos_token_id": 2, **text,
    }  # fmt: skip
    vision_config = {
        "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 8,
    }  # fmt: skip
    return transformers.CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=20)


def _saved(where: Path, **text: Any) -> transformers.CLIPModel:
    torch.manual_seed(0)
    reference = transformers.CLIPModel(_config(**text)).eval()
    redraw(reference, seed=1)
    reference.save_pretrained(where)
    return reference


def _texts(end: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three texts of 9, 8 and 7 tokens, each ending at `end`, right-padded with id 1 (True = padding)."""
    tokens = torch.randint(3, VOCAB - 1, (3, 9), generator=torch.Generator().manual_seed(seed))
    pad = torch.zeros(3, 9, dtype=torch.bool)
    for row in range(3):
        length = 9 - row
        tokens[row, length - 1] = end
        tokens[row, length:] = 1
        pad[row, length:] = True
    return tokens, pad


def _images(height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(2))


def _theirs(model: transformers.CLIPModel, image: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor,
            **options: Any) -> dict[str, torch.Tensor]:  # fmt: skip
    with torch.no_grad():
        output = model(input_ids=tokens, attention_mask=(~pad).long(), pixel_values=image, **options)
    return {name: getattr(output, name) for name in OUTPUTS}


def _ours(model: torch.nn.Module, image: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor) -> dict:
    with torch.no_grad():
        return model(image=image, tokens=tokens, pad=pad)


def _apart(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert all(ours[name].shape == theirs[name].shape for name in OUTPUTS)
    return max((ours[name] - theirs[name]).abs().max().item() for name in OUTPUTS)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[transformers.CLIPModel, Path]:
    """The original checkpoints' kind (eos_token_id 2: end-of-text is the largest id), saved and imported."""
    root = tmp_path_factory.mktemp("clip")
    reference = _saved(root / "hf")
    pretrained.import_pretrained(root / "hf", root / "out")
    return reference, root / "out"


def test_the_import_computes_what_clip_does(imported):
    reference, out = imported
    ours = persist.load(out / "model").eval()
    tokens, pad = _texts(end=VOCAB - 1)
    image = _images()
    theirs = _theirs(reference, image, tokens, pad)
    assert theirs["logits_per_image"].shape == (2, 3)
    assert _apart(_ours(ours, image, tokens, pad), theirs) <= 1e-5
    variables = builder.load_spec(out / "spec.yaml").spec.vars
    assert variables["eos_token"] is None and variables["patch"] == 8 and variables["vision_d_model"] == 24


def test_another_image_size_resizes_the_positions_as_transformers_does(imported):
    """48 × 40 pixels: a 6 × 5 grid for the trained 4 × 4, against transformers' interpolate_pos_encoding."""
    reference, out = imported
    ours = persist.load(out / "model").eval()
    tokens, pad = _texts(end=VOCAB - 1)
    image = _images(48, 40)
    theirs = _theirs(reference, image, tokens, pad, interpolate_pos_encoding=True)
    assert _apart(_ours(ours, image, tokens, pad), theirs) <= 1e-5


def test_export_hf_goes_back_as_the_clip_model_transformers_loads(imported, tmp_path):
    reference, out = imported
    exported = pretrained.export(persist.load(out / "model"), out, tmp_path / "back", lambda _: None,
                                 max_shard_size=10**9)  # fmt: skip
    back = tmp_path / "back"
    assert exported.files == ["config.json", "model.safetensors"]
    names = {}
    for directory in (back, out.parent / "hf"):
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            names[directory] = set(f.keys())
    assert names[back] == names[out.parent / "hf"]
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and config["projection_dim"] == 20
    assert config["text_config"]["eos_token_id"] == 2 and config["vision_config"]["patch_size"] == 8
    loaded = transformers.AutoModel.from_pretrained(back).eval()
    assert type(loaded) is transformers.CLIPModel
    tokens, pad = _texts(end=VOCAB - 1)
    image = _images()
    assert _apart(_theirs(loaded, image, tokens, pad), _theirs(reference, image, tokens, pad)) <= 1e-5


def test_an_eos_token_id_is_read_at_its_first_position_not_at_the_largest_id(tmp_path):
    """Newer configs name end-of-text (here 50, below the texts' other ids): the pooler finds it, where the largest
    id would be another position."""
    reference = _saved(tmp_path / "hf", eos_token_id=50)
    pretrained.import_pretrained(tmp_path / "hf", tmp_path / "out")
    ours = persist.load(tmp_path / "out" / "model").eval()
    assert builder.load_spec(tmp_path / "out" / "spec.yaml").spec.vars["eos_token"] == 50
    tokens, pad = _texts(end=50)
    tokens[:, 0] = VOCAB - 1  # the largest id first: read there, the end would be missed
    image = _images()
    theirs = _theirs(reference, image, tokens, pad)
    assert _apart(_ours(ours, image, tokens, pad), theirs) <= 1e-5
    largest = builder.build(tmp_path / "out" / "spec.yaml", overrides={"eos_token": None}).eval()
    largest.load_state_dict(ours.state_dict())
    assert (_ours(largest, image, tokens, pad)["text_embeds"] - theirs["text_embeds"]).abs().max() > 1e-2


def test_what_the_spec_does_not_implement_is_refused_all_at_once():
    family = FAMILIES["clip"]
    config = _config().to_dict()
    config["vision_config"]["hidden_act"] = "gelu"
    config["text_config"]["attention_dropout"] = 0.1
    with pytest.raises(CheckpointError) as caught:
        spec_variables(family, config, Location("config.json"))
    messages = " ".join(p.message for p in caught.value.problems)
    assert "vision_config.hidden_act is 'gelu'; the clip spec implements quick_gelu" in messages
    assert "text_config.attention_dropout is '0.1'; the clip spec implements 0.0" in messages
    with pytest.raises(CheckpointError, match="text_config is not a mapping of options"):
        spec_variables(family, {**_config().to_dict(), "text_config": [1]}, Location("config.json"))


def test_the_new_blocks_count_flops_as_torch_does_and_quick_gelu_is_transformers():
    small = {
        "vocab": VOCAB, "max_len": 16, "d_model": 32, "heads": 4, "d_ff": 37, "layers": 1, "image_size": 32,
        "patch": 8, "vision_d_model": 24, "vision_heads": 4, "vision_d_ff": 40, "vision_layers": 1, "proj_dim": 20,
    }  # fmt: skip
    typed = pipeline.typed_graph(SPECS / "clip.yaml", overrides=small)
    dims = {"batch": 2, "texts": 3, "seq": 9, "height": 32, "width": 32}
    costs = analyse(typed, pipeline.compile_graph(typed, device="meta"), dims)
    for node in ("logits", "end_of_text", "image_embeds", "text_embeds"):
        assert costs.nodes[node].flops == costs.nodes[node].flops_analytic, node
    assert costs.nodes["logits"].flops == 2 * 2 * 3 * 20
    x = torch.linspace(-6, 6, 101)
    quick_gelu = REGISTRY.get("activation").cls(REGISTRY.get("activation").cls.Params(function="quick_gelu"))
    assert torch.allclose(quick_gelu(x), transformers.activations.ACT2FN["quick_gelu"](x), atol=0, rtol=0)


def test_select_at_token_reads_the_first_position_of_the_token_and_l2_normalize_is_torchs():
    select = REGISTRY.get("select_at_token").cls
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    tokens = torch.tensor([[5, 7, 7, 2], [1, 1, 1, 1]])
    assert torch.equal(select(select.Params(token=7))(x, tokens), torch.stack([x[0, 1], x[1, 0]]))  # none: first
    assert torch.equal(select(select.Params())(x, tokens), torch.stack([x[0, 1], x[1, 0]]))  # largest, first of ties
    normalize = REGISTRY.get("l2_normalize").cls
    y = torch.randn(3, 5)
    assert torch.allclose(normalize(normalize.Params())(y), torch.nn.functional.normalize(y, dim=-1), atol=1e-7)


def test_the_exported_program_keeps_images_texts_and_their_sizes_dynamic(imported, tmp_path):
    """Traced at the spec's trial sizes; run on 3 images of 48 × 40 pixels against 2 padded texts of 9 tokens."""
    from blockgraph.builder.export import export

    _, out = imported
    ours = persist.load(out / "model").eval()
    dims = {"batch": 2, "texts": 2, "seq": 5, "height": 32, "width": 32}
    result = export(ours, ours.typed_graph, dims, "exported-program", tmp_path / "clip.pt2", include_optional=True)
    assert set(result.dynamic) == set(dims) and not result.static
    program = torch.export.load(str(tmp_path / "clip.pt2")).module()
    tokens, pad = _texts(end=VOCAB - 1)
    image = _images(48, 40).repeat(2, 1, 1, 1)[:3]
    with torch.no_grad():
        got = program(image=image, tokens=tokens[:2], pad=pad[:2])
    assert _apart(got, _ours(ours, image, tokens[:2], pad[:2])) <= 1e-5

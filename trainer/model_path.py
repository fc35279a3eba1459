"""What a path given for a model holds, resolved one way for every command that reads a model.

A path is one of:

    a spec file           .yaml, .yml or .json (anything that is not a directory is read as one)
    a saved model         `build --out` (builder.persist): model.safetensors, spec.yaml, blockgraph.json
    a training run        `train --out`: its checkpoint/ (trainer.checkpoint)
    a training checkpoint a run's checkpoint/, or the output of `consolidate`; sharded (--strategy fsdp) when
                          it holds shards instead of model/ (trainer.sharded)
    an imported model     `blockgraph import` (trainer.pretrained): spec.yaml, model/, tokenizer/, pretrained.json

Each command takes what it can use: `inspect` and `validate` read the spec of any of them (a directory's is the
one saved with its weights); `build` and `export` its weights (a sharded one's once consolidated); `translate`
and `generate` a trained model with its text (a checkpoint or an import); `--resume` and `consolidate` a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from blockgraph.builder import persist
from blockgraph.builder.validate import ValidSpec
from blockgraph.common.errors import CheckpointError, Location, Problem, UsageError
from blockgraph.trainer import checkpoint, pretrained
from blockgraph.trainer.text import RECORD

Kind = Literal["spec file", "saved model", "training run", "training checkpoint", "imported model"]

TRAINED = "a training run (train --out), its checkpoint/, a consolidated checkpoint or an imported model"
LOOKED_FOR = (
    f"a saved model ({persist.MANIFEST}, from build --out), a training run or checkpoint ({checkpoint.NAME}/"
    f"{checkpoint.TRAINER} or {checkpoint.TRAINER}), an imported model ({RECORD}); a spec is a .yaml, .yml or "
    ".json file"
)


@dataclass(frozen=True)
class ModelPath:
    """A path given for a model, and where its parts are: the spec that describes it, the saved model holding
    its weights, the training checkpoint, the imported model's folder (see the module notes)."""

    path: Path
    kind: Kind
    spec: Path
    weights: Path | None = None  # a saved model (builder.persist); None: a spec file, or a sharded checkpoint
    checkpoint: Path | None = None
    imported: Path | None = None  # read by trainer.pretrained: an import, or a checkpoint of fine-tuning one
    sharded: bool = False

    @property
    def what(self) -> str:
        """The kind in words, with its article: `a sharded training run`."""
        kind = f"sharded {self.kind}" if self.sharded else self.kind
        return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"

    def load_spec(self, overrides: dict[str, Any] | None = None, *, allow_external_files: bool = False) -> ValidSpec:
        """The spec validated: a spec file with `--set` overrides, or the spec saved with a directory's weights."""
        from blockgraph.builder.pipeline import load_spec

        if self.kind == "spec file":
            return load_spec(self.path, overrides, allow_external_files=allow_external_files)
        self.no_overrides(overrides)
        saved_with = persist.read_manifest(self.weights).plugins if self.weights is not None else ()
        return persist.saved_spec(self.spec, saved_with=saved_with)

    def no_overrides(self, overrides: dict[str, Any] | None) -> None:
        """A directory's saved weights fix its sizes: `--set` applies to spec files only."""
        if overrides and self.kind != "spec file":
            raise UsageError(
                Problem(
                    f"--set does not apply to {self.what}",
                    Location(str(self.path)),
                    hint=f"its saved spec fixes the sizes; to try others, give the spec file itself: {self.spec}",
                )
            )

    def saved_model(self) -> Path | None:
        """The saved model holding the weights; None for a spec file (a model built from it has fresh ones)."""
        if self.sharded:
            raise checkpoint.consolidate_first(self.path, self.checkpoint or self.path)
        return self.weights

    def trained(self, command: str) -> ModelPath:
        """This path, which `command` (translate, generate) decodes with: a checkpoint or an imported model."""
        if self.sharded:
            raise checkpoint.consolidate_first(self.path, self.checkpoint or self.path)
        if self.checkpoint is None and self.imported is None:
            raise self._refused(command, "needs a trained model and its vocabulary", f"give {TRAINED}")
        return self

    def fine_tuned(self) -> Path | None:
        """The imported model `train` starts from (an import, or a checkpoint of fine-tuning one); None for a
        spec file, trained from fresh weights."""
        if self.kind != "spec file" and self.imported is None:
            hint = f"train its spec from fresh weights: blockgraph train {self.spec} ..."
            if self.checkpoint is not None:
                hint = f"continue it: blockgraph train --resume {self.path}"
            raise self._refused("train", "starts from a spec file or an imported model", hint)
        if self.sharded:
            raise checkpoint.consolidate_first(self.path, self.checkpoint or self.path)
        return self.imported

    def run(self, command: str) -> Path:
        """The training checkpoint `command` continues (--resume), gathers (consolidate) or decodes with."""
        if self.checkpoint is None:
            hint = "give a run directory of `blockgraph train` (its --out) or its checkpoint/"
            if self.kind == "imported model":
                hint = f"an imported model is fine-tuned: blockgraph train {self.path} --data FILE"
            raise self._refused(command, "takes a training run", hint)
        return self.checkpoint

    def _refused(self, command: str, needs: str, hint: str) -> UsageError:
        where = Location(str(self.path))
        if not self.path.exists():
            return UsageError(Problem(f"{self.path} does not exist", where, hint=hint))
        return UsageError(Problem(f"{self.path} is {self.what}: {command} {needs}", where, hint=hint))


def resolve(path: str | Path) -> ModelPath:
    """What `path` holds (see the module notes); a directory that holds no model is a located error naming
    what was looked for. Nothing is read but the names of files: each command reads what it uses."""
    path = Path(path)
    if not path.is_dir():
        return ModelPath(path, "spec file", path)
    if persist.is_saved_model(path):
        return ModelPath(path, "saved model", path / persist.SPEC, weights=path)
    found = checkpoint.find(path)
    if found is not None:
        kind: Kind = "training checkpoint" if found == path else "training run"
        imported = found if pretrained.is_pretrained(found) else None
        if checkpoint.is_sharded(found):
            spec = found / checkpoint.SHARDED_SPEC
            return ModelPath(path, kind, spec, checkpoint=found, imported=imported, sharded=True)
        weights = found / checkpoint.MODEL
        return ModelPath(path, kind, weights / persist.SPEC, weights, checkpoint=found, imported=imported)
    if pretrained.is_pretrained(path):
        weights = path / pretrained.MODEL
        return ModelPath(path, "imported model", weights / persist.SPEC, weights, imported=path)
    raise CheckpointError(
        Problem(f"{path} is a directory that holds no model", Location(str(path)), hint=f"looked for {LOOKED_FOR}")
    )

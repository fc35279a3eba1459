"""Class 6: a training directory has one writer. Class 8: runtime limits are checked before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT, TRANSFORMER, assert_clean, bounded, tiny_spec, train_tiny

from blockgraph.trainer import rundir

pytest_plugins = ("harness",)

TINY = ("--set", "d_model=16", "--set", "heads=2", "--set", "enc_layers=1", "--set", "dec_layers=1", "--quiet")
SRC_6000 = ("--dim", "src_len=6000", *TINY[:4])


# --- class 6 -----------------------------------------------------------------------------------------------------


def _holder(directory: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, as a running `train` does."""
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom blockgraph.trainer import rundir\n"
        "with rundir.exclusive(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.mark.parametrize("how", ["--out", "--resume"])
def test_a_second_train_on_a_running_directory_fails_at_once(run_dir, how):
    holder = _holder(run_dir)
    try:
        before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoint").iterdir()}
        args = ("train", TRANSFORMER, "--task", "copy", "--out", run_dir, *TINY) if how == "--out" else (
            "train", "--resume", run_dir, "--max-steps", "4", "--quiet")  # fmt: skip
        outcome = bounded(f"second-train{how}", *args)
        assert_clean(outcome, 1, f"another `blockgraph train` (pid {holder.pid}) is writing to")
        assert outcome.seconds < 5
        assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoint").iterdir()} == before
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_does_not_block_the_next(run_dir):
    holder = _holder(run_dir)
    holder.kill()  # SIGKILL: the lock file stays, the kernel releases the lock
    holder.wait()
    assert (run_dir / rundir.LOCK).exists()
    outcome = bounded("resume-after-kill", "train", "--resume", run_dir, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 0)


def test_a_lock_file_that_is_not_a_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK).symlink_to("/etc/passwd")
    outcome = bounded("lock-symlink", "train", TRANSFORMER, "--task", "copy", "--out", run, *TINY)
    assert_clean(outcome, 1, "is not a training run directory")  # a link is nothing a run writes


def test_metrics_that_are_not_a_file_are_never_written(tmp_path):
    run = train_tiny(tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (run / rundir.METRICS).unlink()
    (run / rundir.METRICS).symlink_to(victim)
    outcome = bounded("metrics-symlink", "train", "--resume", run, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 1, "is not a training run directory")
    assert victim.read_text() == "keep"


# --- class 8 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("inspect", TRANSFORMER, "--dim", "src_len=6000"), "the sequence length 6000 (src_len"),
        (("inspect", TRANSFORMER, "--dim", "tgt_len=5001", "--format", "json"), "exceeds max_len 5000"),
        (("build", TRANSFORMER, "--dim", "src_len=6000", *TINY[:4]), "exceeds max_len 5000"),
        (("export", TRANSFORMER, "--format", "exported-program", "--out", "/nonexistent/m.pt2", *SRC_6000), "max_len"),
    ],
)
def test_a_sequence_longer_than_the_positions_is_a_located_error(args, fragment):
    outcome = bounded("positions-exceeded", *args)
    assert_clean(outcome, 1, fragment, "transformer.yaml:", "max_len")


def test_a_concrete_length_beyond_max_len_is_an_error_of_validate(tmp_path):
    spec = tiny_spec(tmp_path, replace={"shape: [batch, seq]": "shape: [batch, 100]"})
    assert_clean(bounded("positions-concrete", "validate", spec), 1, "the sequence length 100 exceeds max_len 64")


@pytest.mark.parametrize("value", ["10" * 200, "99999999999999999999", "2147483648", "-3", "0", "²", "1e9", "abc", "٣"])
def test_unusable_dimension_sizes(value):
    outcome = bounded("dim-size", "inspect", ROOT / "specs" / "tiny_encoder.yaml", "--dim", f"seq={value}")
    assert_clean(outcome, 1, "sizes are integers from 1 to")


def test_trial_inputs_too_large_to_allocate(tmp_path):
    outcome = bounded("dim-huge-build", "build", tiny_spec(tmp_path), "--dim", "batch=2147483647", "--dim", "seq=60")
    assert_clean(outcome, 1, "the trial inputs would take", "GiB")


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("--set", "vocab=" + "9" * 400),
        ("vars", "vocab: " + "9" * 400),
        ("expression", "vocab: ${10 ** 400}"),
        ("expression", "vocab: ${" + "9" * 400 + "}"),
        ("high", "high: 10000000000000000000"),
        ("dims", "dims: {batch: 100000000000000000000000000000, seq: 5}"),
    ],
)
def test_huge_integers(tmp_path, where, text):
    replace = {
        "vars": {"vocab: 20": text},
        "expression": {"vocab: 20": text},
        "high": {'high: "${vocab}"': text},
        "dims": {"dims: {batch: 2, seq: 5}": text},
    }.get(where, {})
    spec = tiny_spec(tmp_path, replace=replace)
    args = ("build", spec, "--set", text) if where == "--set" else ("build", spec)
    assert_clean(bounded(f"huge-int-{where}", *args), 1)


def test_a_uint8_input_with_a_high_it_cannot_hold(tmp_path):
    spec = tiny_spec(tmp_path, replace={"dtype: int64": "dtype: uint8", 'high: "${vocab}"': "high: 1000"})
    assert_clean(bounded("uint8-high", "build", spec), 1, "high 1000 does not fit uint8: at most 256")


@pytest.mark.parametrize("option", ["symbols=100000000", "train=1000000000000", "max_len=0", "bogus=3", "symbols=x"])
def test_task_options_are_bounded(tmp_path, option):
    outcome = bounded("task-options", "train", TRANSFORMER, "--task", "copy", "--task-options", option, "--out",
                      tmp_path / "run", *TINY)  # fmt: skip
    assert_clean(outcome, 1, "--task-options")


def test_task_options_of_a_checkpoint_are_bounded_too(run_dir):
    import json

    path = run_dir / "checkpoint" / "trainer.json"
    data = json.loads(path.read_text())
    data["config"]["task_options"]["train"] = 10**12
    path.write_text(json.dumps(data))
    outcome = bounded("task-options-resume", "train", "--resume", run_dir, "--max-steps", "3", "--quiet")
    assert_clean(outcome, 1, "task options train: expected an integer from")


def test_translate_caps_its_output_at_the_models_positions(tmp_path):
    """A model with 12 positions: asking for 100 tokens gives at most 12, with a note; a longer source is refused."""
    spec = tmp_path / "short.yaml"
    text = TRANSFORMER.read_text().replace(
        'params: {dim: "${d_model}", dropout:', 'params: {dim: "${d_model}", max_len: 12, dropout:'
    )
    spec.write_text(text)
    run = train_tiny(tmp_path / "run", spec=str(spec))
    outcome = bounded("translate-cap", "translate", run, "1 2 3", "--max-len", "100")
    assert_clean(outcome, 0, "outputs are capped at 12 tokens")
    assert len(outcome.stdout.split()) <= 12
    long = " ".join(["1"] * 20)
    outcome = bounded("translate-long-source", "translate", run, long)
    assert_clean(outcome, 1, "has 21 tokens (its end marks included); the model reads at most 12")


@pytest.mark.parametrize("spec", sorted((ROOT / "specs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_spec_inspects_at_the_largest_sizes(spec):
    """Every named dimension at 2³¹ − 1: a located limit, or figures; never torch's overflow as a traceback."""
    from blockgraph import builder
    from blockgraph.builder.spec import MAX_DIM

    graph = builder.typed_graph(spec).graph
    names = sorted({d for s in graph.inputs.values() for d in s.shape if isinstance(d, str)})
    dims = [arg for name in names for arg in ("--dim", f"{name}={MAX_DIM}")]
    outcome = bounded(f"inspect-max-{spec.stem}", "inspect", spec, *dims, timeout=60)
    assert outcome.code in (0, 1)
    assert_clean(outcome, outcome.code, *(["exceeds max_len"] if outcome.code else []))

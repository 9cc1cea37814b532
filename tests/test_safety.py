"""Nothing the user owns is lost: outputs never replace inputs, cleanup removes only what mlakit made,
a killed run leaves no model-sized temporary folder, and what is written can be found and read again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DEMO_AVAILABLE, make_llama
from safetensors.torch import load_file

import mlakit
from mlakit.cli import main
from mlakit.core.text import DEFAULT_TEXT

FAST = ["--calib-tokens", "1024", "--calib-seq-len", "128", "--rope-dim", "8", "--kv-lora-rank", "16"]
CALIB = ["--tokens", "2048", "--seq-len", "64", "--eval-tokens", "512", "--batch-size", "4"]
ENV = {**os.environ, "PYTHONPATH": str(Path(mlakit.__file__).parent.parent), "OMP_NUM_THREADS": "1"}


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A pico source (with calibration text) and its conversion."""
    root = tmp_path_factory.mktemp("pair")
    src = make_llama(root / "src", tied=False)
    (src / "calib.txt").write_text(DEFAULT_TEXT.read_text()[:60000])
    result = invoke("convert", src, root / "mla", *FAST, "--calib-seq-len", "64", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    return src, root / "mla"


# ---- OUT never replaces an input -----------------------------------------------------------------

def test_convert_refuses_out_that_is_holds_or_lies_in_the_source(pico: Path, tmp_path: Path) -> None:
    before = tree(pico)
    link = tmp_path / "alias"
    link.symlink_to(pico)
    for out in (pico, link, pico / "mla", tmp_path):
        line = one_error(invoke("convert", pico, out, *FAST, "--force"))
        assert "which this run reads" in line, line
    assert tree(pico) == before
    assert not list(tmp_path.glob(".*tmp-*"))


def test_calibrate_and_validate_refuse_to_replace_their_inputs(pair, tmp_path: Path) -> None:
    src, mla = pair
    before = tree(mla), tree(src)
    for out in (mla, src, mla.parent):
        assert "which this run reads" in one_error(invoke("calibrate", mla, out, "--teacher", src, *CALIB, "--force"))
    ckpt = ["--mode", "distill", "--checkpoint-dir"]
    assert "which this run reads" in one_error(invoke("calibrate", mla, tmp_path / "o", "--teacher", src, *CALIB,
                                                      *ckpt, src))
    for report in (mla, src, mla.parent):
        assert "which this run reads" in one_error(invoke("validate", src, mla, "--report", report))
    assert (tree(mla), tree(src)) == before


# ---- --force replaces only what mlakit wrote -----------------------------------------------------

def test_force_never_empties_a_folder_that_is_not_an_mlakit_output(pair, pico: Path, tmp_path: Path) -> None:
    src, mla = pair
    mine = tmp_path / "userdir"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    line = one_error(invoke("convert", pico, mine, *FAST, "--force"))
    assert "not an output of mlakit" in line and "mlakit.json" in line, line
    line = one_error(invoke("calibrate", mla, mine, "--teacher", src, *CALIB, "--force"))
    assert "not an output of mlakit" in line, line
    line = one_error(invoke("convert", pico, mine, *FAST, "--force", "--latent", "native"))
    assert "not an output of mlakit" in line, line
    assert tree(mine) == {"thesis.txt": b"years of work"}
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("convert", pico, empty, *FAST, "--force")
    assert result.exit_code == 0 and (empty / "mlakit.json").is_file(), result.output


def test_force_onto_a_file_is_refused_and_leaves_nothing_behind(pico: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile.txt"
    afile.write_text("notes")
    line = one_error(invoke("convert", pico, afile, *FAST, "--force"))
    assert "is a file" in line, line
    assert afile.read_text() == "notes" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "pico"]


def test_out_that_appears_while_a_run_writes_is_not_replaced(tmp_path: Path) -> None:
    """Checked again at the rename: without --force an OUT made meanwhile stays; with it, only if it is
    an mlakit output."""
    from mlakit.core.errors import MlakitError
    from mlakit.core.guard import atomic_folder

    out = tmp_path / "out"
    for force, made in ((False, "mlakit.json"), (True, "thesis.txt")):
        with pytest.raises(MlakitError, match="appeared while|not an output of mlakit"):
            with atomic_folder(out, force=force) as tmp:
                (tmp / "mlakit.json").write_text("{}")
                out.mkdir(exist_ok=True)
                (out / made).write_text("someone else's")
        assert tree(out) == {made: b"someone else's"}
        shutil.rmtree(out)
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def convert_demo_until(tmp_path: Path, pattern: str) -> subprocess.Popen:
    """`mlakit convert demo TMP_PATH/out` in a subprocess, returned once a file matching PATTERN
    appears in TMP_PATH (the run is then writing)."""
    proc = subprocess.Popen([sys.executable, "-m", "mlakit", "convert", "demo", str(tmp_path / "out"),
                             "--rope-strategy", "fold"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(pattern)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it began writing"
        time.sleep(0.02)
    return proc


@pytest.mark.skipif(not DEMO_AVAILABLE, reason="bundled demo model missing")
def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = convert_demo_until(tmp_path, ".out.*")
    try:
        line = one_error(invoke("convert", "demo", out, "--calib-tokens", "512", "--calib-seq-len", "256"))
        assert "another mlakit run" in line and str(first.pid) in line, line
        assert first.poll() is None, "the first run must still be writing"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- cleanup removes only what mlakit made -------------------------------------------------------

def test_distillation_cleans_only_its_own_checkpoint_files(pair, tmp_path: Path) -> None:
    src, mla = pair
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    run = ["calibrate", mla, None, "--teacher", src, "--data", src / "calib.txt", *CALIB, "--mode", "distill",
           "--save-every", "2", "--teacher-topk", "8"]
    result = invoke(*[tmp_path / "a" if a is None else a for a in run], "--checkpoint-dir", mine)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    result = invoke(*[tmp_path / "b" if a is None else a for a in run], "--checkpoint-dir", tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "b.ckpt").exists()


# ---- a killed run leaves nothing behind ----------------------------------------------------------

@pytest.mark.skipif(not DEMO_AVAILABLE, reason="bundled demo model missing")
def test_sigterm_removes_the_temporary_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = convert_demo_until(tmp_path, ".out.tmp-*")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("terminated"), stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_temporary_folders_are_named_with_their_size(pico: Path, tmp_path: Path) -> None:
    stale = tmp_path / ".out.tmp-k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)
    for part in ("old-123", "exact-n4t1ve", "data-p4ck3d"):
        (tmp_path / f".out.{part}").mkdir()
    result = invoke("convert", pico, tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:") and ".out." in line]
    assert len(warnings) == 4, result.output
    assert "3.0 MiB" in next(line for line in warnings if str(stale) in line)
    assert stale.is_dir(), "stale folders are named, not deleted"


# ---- what is written can be found and read again -------------------------------------------------

def test_records_name_local_inputs_by_absolute_path(pair, tmp_path: Path, monkeypatch) -> None:
    src, mla = pair
    monkeypatch.chdir(src.parent)
    out = tmp_path / "cal"
    result = invoke("calibrate", mla.name, out, "--teacher", src.name, "--data", src / "calib.txt", *CALIB,
                    "--layer-steps", "1")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "mlakit.json").read_text())["calibrate"][-1]
    assert run["teacher"] == str(src.resolve()) and run["converted"] == str(mla.resolve())
    result = invoke("convert", src.name, tmp_path / "conv", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "conv" / "mlakit.json").read_text())["source"]["id"] == str(src.resolve())


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_non_positive_rank_is_refused(pico: Path, tmp_path: Path, rank: str) -> None:
    args = [a for a in FAST if a not in ("--kv-lora-rank", "16")]
    line = one_error(invoke("convert", pico, tmp_path / "out", *args, "--kv-lora-rank", rank))
    assert line == f"error: --kv-lora-rank {rank}: the rank must be positive"


def test_rank_check_in_make_plan(pico: Path) -> None:
    from mlakit.convert.plan import ConvertOptions, make_plan
    from mlakit.core.errors import MlakitError

    with pytest.raises(MlakitError, match="the rank must be positive"):
        make_plan(str(pico), ConvertOptions(kv_lora_rank=0, rope_dim=8))
    with pytest.raises(MlakitError, match="key weight 0.0: must be positive"):
        make_plan(str(pico), ConvertOptions(rope_dim=8, key_weight=0.0))


@pytest.mark.parametrize("tokens", ["0", "32"])
def test_eval_tokens_below_one_row_are_refused(pair, tmp_path: Path, tokens: str) -> None:
    src, mla = pair
    args = [a for a in CALIB if a not in ("--eval-tokens", "512")]
    line = one_error(invoke("calibrate", mla, tmp_path / "o", "--teacher", src, *args, "--eval-tokens", tokens))
    assert f"--eval-tokens {tokens}" in line and "--seq-len 64" in line


def test_output_folder_gets_the_umask_mode(pico: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        result = invoke("convert", pico, tmp_path / "out", *FAST)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_chat_template_is_copied(pico: Path, tmp_path: Path) -> None:
    (pico / "chat_template.jinja").write_text("{{ messages }}")
    (pico / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')
    result = invoke("convert", pico, tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    for name in ("chat_template.jinja", "chat_template.json"):
        assert (tmp_path / "out" / name).read_text() == (pico / name).read_text()


def test_hub_download_fetches_only_the_indexed_shards(tmp_path: Path, monkeypatch) -> None:
    """A Mistral-style repo ships consolidated.safetensors beside the indexed shards: it is not fetched."""
    from fnmatch import fnmatch

    from mlakit.core.checkpoint import resolve_model

    repo = make_llama(tmp_path / "repo", shards=True)
    (repo / "consolidated.safetensors").write_bytes(b"\0" * 1024)
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((revision, allow_patterns))
        snap = tmp_path / "cache" / "snapshots" / "c0ffee"
        snap.mkdir(parents=True, exist_ok=True)
        for f in repo.iterdir():
            if any(fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    folder = resolve_model("someone/model")
    shards = sorted(p.name for p in repo.glob("model-*.safetensors"))
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards
    assert calls[-1] == ("c0ffee", shards)


def test_calibration_that_hurts_keeps_the_converted_weights(pair, tmp_path: Path) -> None:
    src, mla = pair
    out = tmp_path / "cal"
    result = invoke("calibrate", mla, out, "--teacher", src, "--data", src / "calib.txt", *CALIB,
                    "--mode", "distill", "--lr", "3", "--train", "all")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "kept" in warnings[0], result.output
    run = json.loads((out / "mlakit.json").read_text())["calibrate"][-1]
    assert run["after"]["kl"] > run["before"]["kl"] and run["kept"] == "input"
    a, b = load_file(mla / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_layerwise_stage_that_hurts_keeps_the_converted_weights(pair, tmp_path: Path, monkeypatch) -> None:
    """The same rule for the layer-wise stage: its measured after-quality is made worse than before."""
    from dataclasses import replace

    from mlakit.calibrate import run as run_module

    fit = run_module.calibrate_layerwise

    def worse(*args, **kwargs):
        result = fit(*args, **kwargs)
        return replace(result, after=replace(result.after, kl=result.before.kl + 1))

    monkeypatch.setattr(run_module, "calibrate_layerwise", worse)
    src, mla = pair
    out = tmp_path / "cal"
    result = invoke("calibrate", mla, out, "--teacher", src, "--data", src / "calib.txt", *CALIB, "--layer-steps", "1")
    assert result.exit_code == 0, result.output
    assert sum(line.startswith("warning: layer-wise") for line in result.output.splitlines()) == 1, result.output
    assert json.loads((out / "mlakit.json").read_text())["calibrate"][-1]["kept"] == "input"
    a, b = load_file(mla / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_bad_arguments_fail_before_torch_is_imported(tmp_path: Path) -> None:
    code = ("import sys\nfrom mlakit.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
            "    print('exit', exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    for args in (["convert", str(tmp_path / "nope"), "out"], ["convert", "demo", str(tmp_path / "x" / "out")],
                 ["calibrate", str(tmp_path / "nope"), "out"], ["convert", "demo", "out", "--kv-lora-rank", "0"],
                 ["validate", "demo", str(tmp_path / "nope")], ["check", str(tmp_path / "nope")]):
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=120)
        assert done.stdout.strip() == "exit 1 False False", (args, done.stdout, done.stderr)
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_missing_text_files_fail_before_torch_is_imported(tmp_path: Path) -> None:
    """As README promises: a --calib-text, --text or --prompts file that is not there is one line at once."""
    code = ("import sys\nfrom mlakit.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
            "    print('exit', exc.code, 'torch' in sys.modules)\n")
    for args in (["convert", "demo", "out", "--calib-text", "nope.txt"],
                 ["validate", "demo", "demo", "--text", "nope.txt"], ["validate", "demo", "demo", "--prompts", "nope"]):
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=120)
        assert done.stdout.strip() == "exit 2 False", (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0], done.stderr

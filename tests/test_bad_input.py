"""Bad input: one clear error line, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_llama

from mlakit.cli import main

FAST = ["--calib-tokens", "1024", "--calib-seq-len", "128", "--rope-dim", "8"]


def convert_fails(src: str, out: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["convert", src, str(out), *FAST, *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert result.output.rstrip().splitlines()[-1] == errors[0], "the error must be the last line, whole"
    assert not out.exists() or (out / "keep").exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary folder left behind"
    return errors[0]


def test_missing_source(tmp_path: Path) -> None:
    assert "no such folder" in convert_fails(str(tmp_path / "nope"), tmp_path / "out")


def test_unreachable_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("Name or service not known\nAn error happened while trying to locate the files on the Hub.")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    assert "could not download from the hub" in convert_fails("someone/some-model", tmp_path / "out")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no config.json" in convert_fails(str(tmp_path / "empty"), tmp_path / "out")


@pytest.mark.parametrize("model_type,reason", [("qwen3", "q_norm"), ("gemma", "Gemma"), ("gpt2", "mlakit converts")])
def test_unsupported_architecture(tmp_path: Path, model_type: str, reason: str) -> None:
    src = make_llama(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = model_type
    (src / "config.json").write_text(json.dumps(cfg))
    line = convert_fails(str(src), tmp_path / "out")
    assert model_type in line and reason in line


def test_config_without_a_shape_field_names_it(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    line = convert_fails(str(src), tmp_path / "out")
    assert "no hidden_size" in line and "implies" not in line


def test_sliding_window_in_use(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "src", model_type="mistral")
    cfg = json.loads((src / "config.json").read_text())
    cfg["sliding_window"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    assert "sliding_window" in convert_fails(str(src), tmp_path / "out")


def test_rank_too_large(pico: Path, tmp_path: Path) -> None:
    assert "can fill at most" in convert_fails(str(pico), tmp_path / "out", "--rope-dim", "8", "--kv-lora-rank", "4096")


@pytest.mark.parametrize("rope_dim", ["7", "64", "6"])
def test_bad_rope_dim(pico: Path, tmp_path: Path, rope_dim: str) -> None:
    assert "--rope-dim" in convert_fails(str(pico), tmp_path / "out", "--rope-dim", rope_dim)


def test_fp16_is_not_offered(pico: Path, tmp_path: Path) -> None:
    """No choice that is always refused: --help lists bf16 and fp32 only, and fp16 is one error line."""
    help_text = CliRunner().invoke(main, ["convert", "--help"]).output
    assert "[bf16|fp32]" in " ".join(help_text.split()) and "fp16|" not in help_text and "|fp16" not in help_text
    line = convert_fails(str(pico), tmp_path / "out", "--dtype", "fp16")
    assert "'fp16' is not one of 'bf16', 'fp32'" in line and "--help" in line


def test_existing_output_needs_force(pico: Path, tmp_path: Path) -> None:
    """An earlier output is replaced only with --force; a folder of the user's never (tests/test_safety.py)."""
    out = tmp_path / "out"
    args = ["convert", str(pico), str(out), *FAST, "--rope-dim", "8", "--kv-lora-rank", "16"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (out / "keep").write_text("a file in an earlier output")
    assert "--force" in convert_fails(str(pico), out, "--rope-dim", "8", "--kv-lora-rank", "16")
    assert (out / "keep").is_file()
    result = CliRunner().invoke(main, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and not (out / "keep").exists()


def test_truncated_shard(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "src", shards=True)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert "truncated" in convert_fails(str(src), tmp_path / "out")


def test_corrupt_shard_header(pico: Path, tmp_path: Path) -> None:
    (pico / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "corrupt" in convert_fails(str(pico), tmp_path / "out")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "sub/../../x.safetensors"])
def test_shard_names_outside_the_folder_are_refused(tmp_path: Path, shard: str) -> None:
    src = make_llama(tmp_path / "src", shards=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes((src / next(iter(index["weight_map"].values()))).read_bytes())
    line = convert_fails(str(src), tmp_path / "out")
    assert f"shard {shard!r} is not a file inside the model folder" in line


def test_hub_shard_names_outside_the_folder_are_not_downloaded(tmp_path: Path, monkeypatch) -> None:
    from mlakit.core.checkpoint import resolve_model
    from mlakit.core.errors import MlakitError

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append(allow_patterns)
        snap = tmp_path / "snapshots" / "c0ffee"
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../../x"}}))
        return str(snap)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    with pytest.raises(MlakitError, match="not a file inside the model folder"):
        resolve_model("someone/model")
    assert len(calls) == 1, "the weights must not be requested"


def test_dependency_floors_that_keep_loading_safe() -> None:
    """torch >= 2.6: torch.load defaults to weights_only=True; datasets >= 3: no hub loading scripts run."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["datasets"]
    specifiers = {r.name: r.specifier for r in map(Requirement, wanted)}
    for name, last_unsafe, first_safe in (("torch", "2.5.1", "2.6.0"), ("datasets", "2.21.0", "3.0.0")):
        assert not specifiers[name].contains(last_unsafe) and specifiers[name].contains(first_safe), name


def test_missing_weight(tmp_path: Path) -> None:
    src = make_llama(tmp_path / "src", shards=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.layers.1.mlp.up_proj.weight")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing" in convert_fails(str(src), tmp_path / "out")


def test_non_finite_weight_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = make_llama(tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    line = convert_fails(str(src), tmp_path / "out", "--kv-lora-rank", "16")
    assert "model.layers.1.self_attn.k_proj.weight" in line and "NaN" in line


def test_disk_full(pico: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlakit.core.checkpoint.shutil.copyfileobj", full)
    assert "disk full" in convert_fails(str(pico), tmp_path / "out", "--rope-dim", "8", "--kv-lora-rank", "16")


def test_calibration_text_too_short(pico: Path, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("too short")
    line = convert_fails(str(pico), tmp_path / "out", "--rope-dim", "8", "--kv-lora-rank", "16",
                         "--calib-text", str(tmp_path / "short.txt"))
    assert "fewer than one window" in line

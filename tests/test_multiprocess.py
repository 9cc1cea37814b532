"""Distillation past one process: `accelerate launch` over two CPU processes (gloo) trains what one
process trains on the same global batches, and the shipped FSDP config is read by accelerate as
meant (accelerate shards on GPUs only, so FSDP itself is not run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from conftest import DEMO_AVAILABLE
from safetensors.torch import load_file
from test_calibrate import ok, read_record
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3 import modeling_deepseek_v3

from mlakit.core.text import DEFAULT_TEXT

FSDP_CONFIG = Path(str(files("mlakit.calibrate") / "fsdp.yaml"))  # where the installed package has it
# 4 steps of 4 rows of 256 tokens (the demo's training length); --lm-weight 1 so that rows with
# different numbers of labelled positions (the last token of a document has none) must weigh in as
# in one process
DISTILL = ["--mode", "distill", "--seq-len", "256", "--tokens", "4096", "--eval-tokens", "256", "--batch-size", "4",
           "--lr", "1e-4", "--lm-weight", "1", "--precision", "fp32"]
# measured: 5.6e-7 between 1 and 2 processes (the order of float sums), against a largest change of
# 2.5e-4 from the input; 2.8e-4 with a per-process mean of the cross-entropy. In float32: bf16
# autocast's rounding would hide a wrong average under its own differences between the two runs.
TOLERANCE = 1e-5

needs_demo = pytest.mark.skipif(not DEMO_AVAILABLE, reason="the demo model is not bundled in this checkout")
needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch has no gloo backend")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """The demo converted at kv_lora_rank 32 in fp32 (so that output rounding hides no difference), and
    calibration text of many short documents (the bundled docstrings, one per paragraph)."""
    root = tmp_path_factory.mktemp("demo")
    text = DEFAULT_TEXT.read_text()[:100000]
    (root / "calib.txt").write_text(text)
    with (root / "docs.jsonl").open("w") as fh:
        for paragraph in filter(str.strip, text.split("\n\n")):
            fh.write(json.dumps({"text": paragraph}) + "\n")
    ok("convert", "demo", root / "mla", "--calib-text", root / "calib.txt", "--calib-tokens", "4096",
       "--calib-seq-len", "128", "--kv-lora-rank", "32", "--dtype", "fp32")
    return root / "mla", root / "docs.jsonl"


def launch(tmp_path: Path, *args, config: list[str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch -m mlakit calibrate ARGS`, two processes on the CPU unless `config` says
    otherwise; accelerate's own default config (HF_HOME) is kept out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf-home")}
    how = config or ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *how, "-m", "mlakit", "calibrate",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


@needs_demo
@needs_gloo
@pytest.mark.parametrize("teacher", [[], ["--teacher-topk", "64"]], ids=["live", "cached"])
def test_two_processes_train_what_one_trains(demo, tmp_path: Path, teacher: list[str]) -> None:
    mla, data = demo
    args = [mla, None, "--data", data, *DISTILL, *teacher]
    ok("calibrate", *[tmp_path / "one" if a is None else a for a in args])
    two = launch(tmp_path, *[tmp_path / "two" if a is None else a for a in args])
    assert two.returncode == 0, two.stdout + two.stderr
    runs = {n: read_record(tmp_path / n)["calibrate"][-1] for n in ("one", "two")}
    assert all(run["kept"] == "calibrated" and run["steps"] == 4 for run in runs.values()), runs
    assert runs["two"]["final_loss"] == pytest.approx(runs["one"]["final_loss"], rel=1e-5)
    assert runs["two"]["after"]["kl"] == pytest.approx(runs["one"]["after"]["kl"], rel=1e-5)
    start, one, two = (load_file(p / "model.safetensors") for p in (mla, tmp_path / "one", tmp_path / "two"))
    assert one.keys() == two.keys() == start.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= TOLERANCE
    assert max((one[k] - start[k]).abs().max().item() for k in one) >= 10 * TOLERANCE  # the check means something


@needs_demo
def test_fsdp_config_is_refused_on_the_cpu(demo, tmp_path: Path) -> None:
    """accelerate would quietly train unsharded; distillation says so in one line and writes nothing."""
    mla, data = demo
    result = launch(tmp_path, mla, tmp_path / "out", "--data", data, *DISTILL,
                    config=["--config_file", FSDP_CONFIG, "--num_processes", "1"])
    assert result.returncode != 0
    assert "error: the accelerate config asks for FSDP, which accelerate runs on GPUs only" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fsdp_config_is_read_by_accelerate_as_meant(monkeypatch) -> None:
    """The environment `accelerate launch --config_file .../calibrate/fsdp.yaml` gives each process makes
    FSDP2 wrap every DeepSeek-V3 decoder layer, with sharded checkpoints and without cpu-ram-efficient
    loading (the config's comments say why)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy, StateDictType

    config = load_config_from_file(str(FSDP_CONFIG))
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision == "bf16"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(FSDP_CONFIG), "--num_processes", "2", "-m", "mlakit", "calibrate"]))
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert not plugin.cpu_ram_efficient_loading and not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert not plugin.activation_checkpointing  # distillation checkpoints through transformers
    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
                           qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=2)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    plugin.set_auto_wrap_policy(model)  # raises when the model has no layer of the class named
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {modeling_deepseek_v3.DeepseekV3DecoderLayer}

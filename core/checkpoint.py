"""Checkpoint I/O: resolve a source, read tensors lazily from shards, write shards atomically.

Reading follows the shard index so that one tensor at a time is materialized; writing fills
shards up to a byte budget, names them the Hugging Face way and finishes with an index. Output
goes to a temporary folder beside the destination and is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlakit.core.errors import MlakitError
from mlakit.core.guard import RECORD, disk_error, local_model, writing

# Everything but the weights; the weights are fetched second, only the shards the index names (a repo
# may also ship the same weights in another layout, e.g. Mistral's consolidated.safetensors).
HUB_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
DEFAULT_SHARD_BYTES = 2 * 1024**3


def resolve_model(source: str, revision: str | None = None) -> Path:
    """Turn `demo`, a local folder or a hub id into a local folder holding config.json."""
    folder = local_model(source)
    if folder is not None:
        return folder
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(source, revision=revision, allow_patterns=HUB_PATTERNS))
        index = local / "model.safetensors.index.json"
        weights = sorted(set(weight_map(index).values())) if index.is_file() else ["model.safetensors"]
        # the snapshot folder is named by its commit: the weights come from the same one
        local = Path(snapshot_download(source, revision=local.name, allow_patterns=weights))
    except MlakitError:
        raise
    except Exception as exc:  # the hub client raises many types; all mean "could not fetch"
        raise MlakitError(f"{source}: could not download from the hub ({type(exc).__name__}: {exc})") from exc
    if not all((local / name).is_file() for name in weights):
        raise MlakitError(f"{source}: the hub repo has no safetensors weights; convert it to safetensors first")
    return local


def weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file of a `model.safetensors.index.json`, refusing a shard name that is not a
    plain relative path inside the folder: an absolute or `../` name would read (or download) a file
    elsewhere."""
    names = read_json(index).get("weight_map")
    if not isinstance(names, dict):
        raise MlakitError(f"{index}: no weight_map")
    for shard in set(names.values()):
        path = PurePosixPath(str(shard))
        if not shard or path.is_absolute() or ".." in path.parts or "\\" in str(shard):
            raise MlakitError(f"{index}: shard {shard!r} is not a file inside the model folder; refusing to read it")
    return names


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise MlakitError(f"{path}: missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MlakitError(f"{path}: not valid JSON ({exc})") from exc


def _read_header(path: Path) -> dict[str, dict]:
    """A shard's header (dtype, shape and offsets of every tensor), refusing a truncated or corrupt
    shard before any work starts."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise MlakitError(f"{path}: corrupt safetensors file ({exc}); download it again") from exc
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + header_len + end != size:
        raise MlakitError(
            f"{path}: truncated or corrupt ({size} bytes, header says {8 + header_len + end}); download it again"
        )
    return header


# safetensors dtype names (format knowledge of the file layout lives here with the writer)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
# what a header may name; 8-bit floats are read (checkpoints ship them) but never written
HEADER_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()} | {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorInfo:
    """Dtype and shape of a stored tensor, known without reading it."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _tensor_info(shard: Path, name: str, entry: dict) -> TensorInfo:
    if entry["dtype"] not in HEADER_DTYPES:
        raise MlakitError(f"{shard}: tensor {name} is stored as {entry['dtype']}, which mlakit does not read")
    return TensorInfo(HEADER_DTYPES[entry["dtype"]], tuple(entry["shape"]))


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, checked a slice at a time so that no tensor-sized mask is made
    (8-bit floats, which isfinite does not take, as float32)."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    step = 2**24
    return all(bool(torch.isfinite(flat[i : i + step].float() if tensor.element_size() == 1 else flat[i : i + step])
                    .all()) for i in range(0, flat.numel(), step))


class CheckpointReader:
    """Lazy access to the tensors of a model folder (safetensors shards or a single .bin file).

    Dtype and shape of every tensor come from the shard headers, so that checks and plans read no
    weight."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._where: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            for name, shard in weight_map(index).items():
                self._where[name] = folder / shard
        elif single.is_file():
            self._where = {name: single for name in _read_header(single)}
        elif (folder / "pytorch_model.bin").is_file():
            self._load_bin(folder / "pytorch_model.bin")
        else:
            raise MlakitError(f"{folder}: no model.safetensors, shard index or pytorch_model.bin found")
        headers = {}
        for shard in sorted(set(self._where.values())):
            if not shard.is_file():
                raise MlakitError(f"{shard}: listed in the shard index but missing")
            headers[shard] = _read_header(shard)
        for name, shard in self._where.items():
            if name in headers[shard]:  # else reported missing by whoever needs it
                self._info[name] = _tensor_info(shard, name, headers[shard][name])

    def _load_bin(self, path: Path) -> None:
        try:
            self._bin = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # pickle errors come in many types
            raise MlakitError(f"{path}: cannot be read safely ({exc}); convert it to safetensors") from exc
        self._info = {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in self._bin.items()}

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        """Dtype and shape of a tensor, from its shard's header."""
        if name not in self._info:
            raise MlakitError(f"{self.folder}: weight {name} is missing from the checkpoint")
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped from its shard, refused when it holds a NaN or an infinity (which
        would otherwise surface as a failed eigen-solve after the work, naming no weight).

        The handle is closed at once, so the mapping lives exactly as long as the tensor: pages of
        tensors already dropped leave resident memory, which a handle kept open would hold."""
        self.info(name)
        if self._bin is not None:
            tensor = self._bin[name].clone()
        else:
            with safe_open(self._where[name], "pt") as fh:
                tensor = fh.get_tensor(name)
        if not _finite(tensor):
            raise MlakitError(f"{self._where.get(name, self.folder)}: tensor {name} holds NaN or infinite values; "
                              "the checkpoint is damaged (download it again) or was saved from a diverged run")
        return tensor

    def dtype(self) -> torch.dtype:
        """The dtype most weight elements are stored in, from the headers."""
        elements: Counter[torch.dtype] = Counter()
        for name, info in self._info.items():
            if name.endswith("weight"):
                elements[info.dtype] += math.prod(info.shape)
        if not elements:
            raise MlakitError(f"{self.folder}: the checkpoint holds no weights")
        return elements.most_common(1)[0][0]


class ShardWriter:
    """Stream tensors into safetensors shards of at most `max_bytes`, then name them and write the index.

    Each tensor's bytes go to disk as it is added, so the writer holds no tensors: a shard's data is
    appended to a scratch file, and when the shard is full its header (which the format puts first)
    is written to the shard file and the data copied after it in 64 MiB pieces."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = folder
        self.max_bytes = max_bytes
        self._entries: dict[str, dict] = {}
        self._data = None
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        offset = self._data.tell() if self._data else 0
        if self._entries and offset + nbytes > self.max_bytes:
            self._flush()
            offset = 0
        path = self._path(".data")
        try:
            if self._data is None:
                self._data = open(path, "wb")
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        except OSError as exc:
            raise disk_error(exc, path) from exc
        self._entries[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [offset, offset + nbytes]}
        self.total_bytes += nbytes

    def _path(self, suffix: str) -> Path:
        return self.folder / f"shard-{len(self._shards):05d}{suffix}"

    def _flush(self) -> None:
        """Header first, padded with spaces to 8 bytes as the format allows, then the data."""
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        data, path = self._path(".data"), self._path(".tmp")
        try:
            if self._data is None:
                data.touch()
            else:
                self._data.close()
            with open(path, "wb") as out, open(data, "rb") as src:
                out.write(struct.pack("<Q", len(header)) + header)
                shutil.copyfileobj(src, out, 64 * 2**20)
            data.unlink()
        except OSError as exc:
            raise disk_error(exc, path) from exc
        self._shards.append(list(self._entries))
        self._entries, self._data = {}, None

    def close(self) -> None:
        """Give the shards their final names and write model.safetensors.index.json."""
        if self._entries or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.folder / "model.safetensors.index.json", index)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written under a temporary name and renamed, so that a file present is
    complete; a failed write (a full disk) is one error line."""
    tmp = path.with_suffix(".tmp")
    with writing(tmp):
        save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def json_text(obj: object) -> str:
    """The JSON files mlakit writes, as text: indented, keys in their order."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_json(path: Path, obj: object) -> None:
    try:
        path.write_text(json_text(obj))
    except OSError as exc:
        raise disk_error(exc, path) from exc


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat template and generation files, which stay valid for the converted model."""
    names = []
    for path in sorted(src.iterdir()):
        is_tok = path.name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens",
                                       "chat_template"))
        if path.is_file() and (is_tok or path.name == "generation_config.json" or path.suffix == ".tiktoken"):
            try:
                shutil.copy2(path, dst / path.name)
            except OSError as exc:
                raise disk_error(exc, dst / path.name) from exc
            names.append(path.name)
    return names


class Export:
    """Write OUT from a converted folder: the tensors given, every other tensor copied from CONVERTED,
    then config and tokenizer files, then mlakit.json with a calibration run's record appended.
    Every pass that rewrites some layers of a converted model (padding, native latent, calibration)
    writes through it."""

    def __init__(self, converted: Path, folder: Path):
        self.converted = converted
        self.folder = folder
        self.reader = CheckpointReader(converted)
        self.dtype = self.reader.dtype()
        self.writer = ShardWriter(folder)
        self.written: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.writer.add(name, tensor.detach().to(self.dtype))
            self.written.add(name)

    def close(self) -> None:
        """Copy every tensor not given, finish the shards, add config and tokenizer files."""
        for name in self.reader.names:
            if name not in self.written:
                self.writer.add(name, self.reader.get(name))
        self.writer.close()
        write_json(self.folder / "config.json", read_json(self.converted / "config.json"))
        copy_side_files(self.converted, self.folder)

    def record(self, run: dict) -> dict:
        """Write mlakit.json: CONVERTED's record with this run appended to its calibrate list."""
        record = read_json(self.converted / RECORD) if (self.converted / RECORD).is_file() else {}
        record["calibrate"] = [*record.get("calibrate", []), run]
        write_json(self.folder / RECORD, record)
        return record

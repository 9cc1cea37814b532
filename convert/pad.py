"""A zero-padded latent: a converted folder rewritten at a wider kv_lora_rank than the source fills.

Engines take only some latent widths (core/engines.py); where the one an engine takes is wider than
the source's keys and values can fill, the conversion runs at the widest the source fills and the
latent is padded with zero dims (`deepseek.pad_latent`): the same model, served, at a cache larger
than it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlakit.core import deepseek
from mlakit.core.checkpoint import Export, read_json, write_json
from mlakit.core.guard import RECORD, atomic_folder, check_output, scratch_folder


def pad_folder(filled: Path, out: Path, rank: int) -> dict:
    """Write the converted folder `filled` into `out` with its latent zero-padded to `rank`; return
    its record, with the padding and the cache it now has."""
    raw = read_json(filled / "config.json")
    export = Export(filled, out)
    for i in range(raw["num_hidden_layers"]):
        names = [*deepseek.attention_names(i).values(), f"model.layers.{i}.input_layernorm.weight"]
        tensors = {name: export.reader.get(name) for name in names}
        export.add(deepseek.pad_latent(tensors, i, rank))
    export.close()
    write_json(out / "config.json", {**raw, "kv_lora_rank": rank})
    record = read_json(filled / RECORD) if (filled / RECORD).is_file() else {}
    if "shape" in record:
        kv, rope = record["kv_cache"], record["shape"]["qk_rope"]
        width = rank + rope
        record["latent_padding"] = {"filled": raw["kv_lora_rank"], "kv_lora_rank": rank}
        record["shape"]["kv_lora_rank"] = rank
        per_element = kv["converted_bytes_per_token"] // kv["converted_elements_per_token_layer"]
        kv.update(converted_elements_per_token_layer=width, converted_bytes_per_token=width * per_element,
                  reduction_percent=round(100 * (1 - width / kv["source_elements_per_token_layer"]), 2))
    write_json(out / RECORD, record)
    return record


def convert_padded(source: str, out: Path, convert: Callable[[str, Path], dict], rank: int, force: bool) -> dict:
    """`convert(source, folder)` into a staging folder beside OUT, then its latent padded to `rank` into OUT."""
    check_output(out, force)
    with scratch_folder(out, "pad") as stage:
        filled = stage / "filled"
        convert(source, filled)
        with atomic_folder(out, force) as tmp:
            return pad_folder(filled, tmp, rank)


def pad_summary(record: dict) -> str:
    """The line a user reads after a padded conversion."""
    pad = record["latent_padding"]
    return (f"latent zero-padded from {pad['filled']} to kv_lora_rank {pad['kv_lora_rank']} (exact): the cache holds "
            f"{record['kv_cache']['converted_elements_per_token_layer']} elements per token and layer, the source's "
            f"{record['kv_cache']['source_elements_per_token_layer']}")

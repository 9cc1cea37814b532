"""`mlakit push`: write the model card, create the hub repo, upload the folder.

Only a folder that passes check and carries a validation report as new as its weights is pushed,
so every published model has its evidence attached. The upload is huggingface_hub's
`upload_folder` (LFS for large files, the token from HF_TOKEN or `hf auth login`, HF_ENDPOINT
honored); success is reported only after the hub has answered with a commit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import filter_repo_objects

from mlakit.core.checkpoint import read_json
from mlakit.core.errors import MlakitError
from mlakit.validate.card import REPORT_DIR, model_card
from mlakit.validate.check import require_mla
from mlakit.validate.report import human_bytes

CARD = "README.md"
# Temporary folders of atomic writes and other hidden files never leave the machine.
IGNORE = [".*", "*/.*"]


@dataclass
class PushPlan:
    """What an upload would send: the card text and every file with its size."""

    folder: Path
    repo_id: str
    card: str
    files: list[tuple[str, int]]

    def describe(self) -> str:
        total = sum(size for _, size in self.files)
        lines = [f"{constants.ENDPOINT}/{self.repo_id}: {len(self.files)} files, {human_bytes(total)}"]
        lines += [f"  {name:48} {human_bytes(size):>12}" for name, size in self.files]
        return "\n".join(lines)


def plan_push(folder: Path, repo_id: str) -> PushPlan:
    """Check the folder and its report, render the card, list the files; nothing is written."""
    if not folder.is_dir():
        raise MlakitError(f"{folder}: no such folder")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise MlakitError(f"{repo_id}: not a hub repo id of the form owner/name")
    require_mla(folder, str(folder))
    report_path = folder / REPORT_DIR / "report.json"
    if not report_path.is_file():
        raise MlakitError(f"{folder}: no validation report ({REPORT_DIR}/report.json); run "
                          f"`mlakit validate SOURCE {folder}` first")
    report = read_json(report_path)
    record = folder / "mlakit.json"
    if record.is_file() and read_json(record) != report.get("conversion"):
        raise MlakitError(f"{folder}: the validation report is older than the model (mlakit.json changed); run "
                          f"`mlakit validate SOURCE {folder}` again")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = [n for n in filter_repo_objects(names, ignore_patterns=IGNORE) if n != CARD]
    card = model_card(repo_id, report)
    files = [(CARD, len(card.encode()))] + [(n, (folder / n).stat().st_size) for n in kept]
    return PushPlan(folder, repo_id, card, files)


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None, dry_run: bool = False,
         log: Callable[[str], None] = print) -> str | None:
    """Upload FOLDER to REPO_ID with its model card; return the commit URL (None for a dry run)."""
    plan = plan_push(folder, repo_id)
    if dry_run:
        log(plan.describe())
        log(f"dry run: nothing written or uploaded ({CARD} would be written into {folder} first)")
        return None
    token = get_token()
    if not token:
        raise MlakitError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    card_path = folder / CARD
    tmp = card_path.with_name(f".{CARD}.tmp")
    try:
        tmp.write_text(plan.card, encoding="utf-8")
        os.replace(tmp, card_path)
    except OSError as exc:
        raise MlakitError(f"cannot write {card_path}: {exc.strerror or exc}") from exc
    api = HfApi(token=token)
    where = f"{constants.ENDPOINT}/{repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        log(plan.describe())
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, ignore_patterns=IGNORE,
                                   commit_message="Upload MLA model converted and validated by mlakit")
    except Exception as exc:  # the hub client raises HTTP, connection and validation errors alike
        first = (str(exc).splitlines() or [""])[0]
        raise MlakitError(f"upload to {where} failed ({type(exc).__name__}: {first})") from exc
    return commit.commit_url

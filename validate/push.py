"""`mlakit push`: create the hub repo and upload the folder with its model card, in one commit.

Only a folder that passes check and carries a validation report as new as its weights is pushed,
so every published model has its evidence attached. The user's folder is never written: the card
and the records, rewritten so that no local path goes public (`card.public`), are uploaded from
memory beside the folder's other files, in one `create_commit` (LFS for large files, the token
from HF_TOKEN or `hf auth login`, HF_ENDPOINT honored); success is reported only after the hub
has answered with a commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.utils import filter_repo_objects

from mlakit.core.checkpoint import json_text, read_json
from mlakit.core.errors import MlakitError
from mlakit.core.guard import RECORD
from mlakit.validate.card import REPORT_DIR, model_card, public
from mlakit.validate.check import require_mla
from mlakit.validate.report import REPORT_MD, human_bytes, render_markdown
from mlakit.validate.report import REPORT_JSON as REPORT_NAME

CARD = "README.md"
REPORT_JSON = f"{REPORT_DIR}/{REPORT_NAME}"
# Temporary folders of atomic writes and other hidden files never leave the machine.
IGNORE = [".*", "*/.*"]


@dataclass
class PushPlan:
    """What an upload sends: every file in the repo by its path, as bytes made here (the card, the
    records with local paths rewritten) or as the folder's own file."""

    folder: Path
    repo_id: str
    card: str
    files: dict[str, bytes | Path]
    notes: list[str]

    def size(self, name: str) -> int:
        content = self.files[name]
        return len(content) if isinstance(content, bytes) else content.stat().st_size

    def describe(self) -> str:
        total = sum(self.size(name) for name in self.files)
        lines = [f"{constants.ENDPOINT}/{self.repo_id}: {len(self.files)} files, {human_bytes(total)}"]
        lines += [f"  {name:48} {human_bytes(self.size(name)):>12}"
                  + ("  (made for the upload)" if isinstance(content, bytes) else "")
                  for name, content in self.files.items()]
        return "\n".join(lines + self.notes)

    def operations(self) -> list[CommitOperationAdd]:
        return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in self.files.items()]


def plan_push(folder: Path, repo_id: str) -> PushPlan:
    """Check the folder and its report, render the card, list the files; nothing is written."""
    if not folder.is_dir():
        raise MlakitError(f"{folder}: no such folder")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise MlakitError(f"{repo_id}: not a hub repo id of the form owner/name")
    require_mla(folder, str(folder))
    if not (folder / REPORT_JSON).is_file():
        raise MlakitError(f"{folder}: no validation report ({REPORT_JSON}); run `mlakit validate SOURCE {folder}` "
                          "first")
    report = read_json(folder / REPORT_JSON)
    record = read_json(folder / RECORD) if (folder / RECORD).is_file() else None
    if record is not None and record != report.get("conversion"):
        raise MlakitError(f"{folder}: the validation report is older than the model ({RECORD} changed); run "
                          f"`mlakit validate SOURCE {folder}` again")
    report = public(report)
    card = model_card(repo_id, report)
    made = {CARD: card.encode(), REPORT_JSON: json_text(report).encode(),
            f"{REPORT_DIR}/{REPORT_MD}": render_markdown(report).encode()}
    if record is not None:
        made[RECORD] = json_text(public(record)).encode()
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files: dict[str, bytes | Path] = {CARD: made[CARD]}
    files |= {n: made.get(n, folder / n) for n in filter_repo_objects(names, ignore_patterns=IGNORE) if n != CARD}
    notes = [f"  {folder / CARD} stays on this machine: the model card takes its place in the repo"] \
        if (folder / CARD).is_file() else []
    return PushPlan(folder, repo_id, card, files, notes)


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None, dry_run: bool = False,
         log: Callable[[str], None] = print) -> str | None:
    """Upload FOLDER to REPO_ID with its model card; return the commit URL (None for a dry run)."""
    plan = plan_push(folder, repo_id)
    token = get_token()
    if dry_run:
        log(plan.describe())
        log(f"{CARD}, the model card the upload would carry:\n{plan.card}")
        if not token:
            log("no Hugging Face token is set: a real push needs `hf auth login` or HF_TOKEN")
        log(f"dry run: nothing written or uploaded; {folder} is never written")
        return None
    if not token:
        raise MlakitError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    api = HfApi(token=token)
    where = f"{constants.ENDPOINT}/{repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        log(plan.describe())
        commit = api.create_commit(repo_id, plan.operations(), revision=revision,
                                   commit_message="Upload MLA model converted and validated by mlakit")
    except Exception as exc:  # the hub client raises HTTP, connection and validation errors alike
        first = (str(exc).splitlines() or [""])[0]
        raise MlakitError(f"upload to {where} failed ({type(exc).__name__}: {first})") from exc
    return commit.commit_url

"""Pushing a verified export to the Hugging Face Hub.

`plan_push` decides everything without the network: it refuses an export whose fresh-process reload check
did not pass, or whose files changed since the export, and returns the exact file list and the model card
that would be uploaded (re-rendered from `export.json`, with the repository id in the loading code).
`push_export` is a thin layer over huggingface_hub: `create_repo` then one `upload_folder` commit, after
which the repository holds exactly the planned files.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .record import EXPORT_RECORD, read_export_record

logger = logging.getLogger("hf_modelopt")

CARD = "README.md"


class PushRefusedError(UserError):
    """The folder is not an export that may be pushed."""


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    private: bool
    files: list[str]  # paths relative to `folder`, as they will be in the repository
    card: str  # the README.md that will be uploaded


def plan_push(folder, repo_id: str, private: bool = False) -> PushPlan:
    """What `push_export` would upload; `PushRefusedError` naming the reason when it must not."""
    from .card import render_model_card

    folder = Path(folder)
    record = read_export_record(folder)
    if record is None:
        raise PushRefusedError(f"{folder}: no {EXPORT_RECORD}: not a finished hf-modelopt export (run a recipe, "
                               "whose export stage writes it last)")
    check = record.get("reload_check", {})
    if not check.get("passed"):
        why = "was skipped (export stage with verify: false)" if check.get("skipped") else "did not pass"
        raise PushRefusedError(f"{folder}: the export's fresh-process reload check {why}; only verified exports are "
                               "pushed: rerun the recipe with the export stage's verify on")
    for name, size in record["files"].items():
        path = folder / name
        if not path.is_file():
            raise PushRefusedError(f"{folder}: {name} is listed in {EXPORT_RECORD} but missing")
        if name != CARD and path.stat().st_size != size:
            raise PushRefusedError(f"{folder}: {name} changed since the export ({path.stat().st_size} bytes, "
                                   f"{size} when verified); export again")
    card = str(render_model_card(record, (folder / "recipe.yaml").read_text(), load_from=repo_id))
    return PushPlan(folder, repo_id, private, sorted([*record["files"], EXPORT_RECORD]), card)


def push_export(folder, repo_id: str, private: bool = False, token: str | None = None, api=None) -> str:
    """Create `repo_id` if needed and upload the planned files in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    from ..stages import link_or_copy

    plan = plan_push(folder, repo_id, private)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    # The upload folder holds the planned files only (hard links) and the card with the repository id in it.
    with tempfile.TemporaryDirectory(dir=plan.folder.parent, prefix=f".{plan.folder.name}.push-") as scratch:
        upload = Path(scratch)
        for name in plan.files:
            target = upload / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == CARD:
                target.write_text(plan.card)
            else:
                link_or_copy(plan.folder / name, target)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=os.fspath(upload),
                                   commit_message=f"hf-modelopt export of {plan.folder.name}",
                                   delete_patterns="*")  # files of earlier pushes that this export lacks go
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("Pushed %d files to https://huggingface.co/%s (%s)", len(plan.files), repo_id, url)
    return url

"""Pushing a verified export to the Hugging Face Hub.

`plan_push` decides everything without the network: it refuses an export whose fresh-process reload check
did not pass, or whose files are not exactly those of its manifest, and returns the exact file list and the
model card that would be uploaded (re-rendered from `export.json`, with the repository id in the loading code).
What is uploaded: only the files `export.json` lists, each a regular file inside the folder whose sha256 is
the recorded one. A listed file that is a symlink, leaves the folder, is missing or changed refuses the push
(one line naming it); anything else in the folder (user files, symlinks, `stages/`) is skipped: it was never
part of the export. A text file that names the folder's absolute local path refuses the push too.
`push_export` is a thin layer over huggingface_hub: `create_repo` then one `upload_folder` commit of copies
of those files (hashed again after copying: what is uploaded is what was checked), after which the repository
holds exactly the planned files. A Hub that cannot be reached is one line, not a traceback.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import UnsafePathError, copy_file, inside, sha256_file
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
    files = record.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and "sha256" in e for e in files.values()):
        raise PushRefusedError(f"{folder}: {EXPORT_RECORD} records no sha256 for its files (made by an older "
                               "hf-modelopt); export again: `hf-modelopt run RECIPE --output-dir OUTPUT --rerun-from "
                               "export`")
    for name, entry in files.items():
        _checked_file(folder, name, entry, check_hash=name != CARD)  # (the card is rendered again below)
    settings = folder / "recipe.yaml"  # (written when the export was given the settings that produced the model)
    card = str(render_model_card(record, settings.read_text() if "recipe.yaml" in files else None, load_from=repo_id))
    return PushPlan(folder, repo_id, private, sorted([*files, EXPORT_RECORD]), card)


def _checked_file(folder: Path, name: str, entry: dict, check_hash: bool = True) -> Path:
    """The listed file `name` of the export in `folder`, or `PushRefusedError` naming why it cannot be uploaded."""
    try:
        path = inside(folder / name, folder)
    except UnsafePathError:
        raise PushRefusedError(f"{folder}: {EXPORT_RECORD} lists {name!r}, which is outside the folder; nothing "
                               "outside an export is ever uploaded") from None
    if path.is_symlink():
        raise PushRefusedError(f"{folder}: {name} is a symlink; push never follows symlinks: put the file itself "
                               "there, or export again")
    if not path.is_file():
        raise PushRefusedError(f"{folder}: {name} is listed in {EXPORT_RECORD} but missing")
    if check_hash and sha256_file(path) != entry.get("sha256"):
        raise PushRefusedError(f"{folder}: {name} changed since the export ({path.stat().st_size} bytes, "
                               f"{entry.get('size')} when verified; sha256 differs); export again")
    return path


def _local_paths_in(upload: Path, folder: Path) -> None:
    """Refuse text files that name the export folder's absolute path (or its parent's): a machine's local paths
    are not published. The export writes paths relative to itself; this catches files edited or made elsewhere."""
    local = {str(folder.resolve()), str(folder.resolve().parent)} - {"/"}
    for file in sorted(upload.rglob("*")):
        if file.suffix in (".json", ".yaml", ".yml", ".md", ".txt") and file.is_file():
            text = file.read_text(errors="replace")
            found = next((path for path in sorted(local, key=len, reverse=True) if path in text), None)
            if found is not None:
                raise PushRefusedError(f"{folder}: {file.relative_to(upload)} contains the local path {found}; "
                                       "export again with this version (it writes paths relative to the export)")


def push_export(folder, repo_id: str, private: bool = False, token: str | None = None, api=None) -> str:
    """Create `repo_id` if needed and upload the planned files in one commit; returns the commit URL."""
    from huggingface_hub import HfApi, constants

    plan = plan_push(folder, repo_id, private)
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"push to {repo_id}: the Hub is offline (HF_HUB_OFFLINE=1, set by you or because "
                        "huggingface.co was unreachable); go online, then push again")
    record = read_export_record(plan.folder)
    # The upload folder (inside the export, removed afterwards) holds copies of the planned files, hashed again
    # once copied, and the card with the repository id in it.
    with tempfile.TemporaryDirectory(dir=plan.folder, prefix=".hf-modelopt-push-") as scratch:
        upload = Path(scratch)
        for name in plan.files:
            target = upload / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == CARD:
                target.write_text(plan.card)
                continue
            copy_file(_checked_file(plan.folder, name, {}, check_hash=False), target)
            if name != EXPORT_RECORD and sha256_file(target) != record["files"][name]["sha256"]:
                raise PushRefusedError(f"{plan.folder}: {name} changed while it was being copied for upload; "
                                       "push again")
        _local_paths_in(upload, plan.folder)
        try:
            api = api or HfApi(token=token)
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=os.fspath(upload),
                                       commit_message=f"hf-modelopt export of {plan.folder.name}",
                                       delete_patterns="*")  # files of earlier pushes that this export lacks go
        except Exception as err:  # the network layer's errors (httpx, requests, HfHubHTTPError) vary by version
            raise UserError(f"push to {repo_id} failed: {type(err).__name__}: "
                            f"{' '.join(str(err).split())[:200]}") from None
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("Pushed %d files to https://huggingface.co/%s (%s)", len(plan.files), repo_id, url)
    return url

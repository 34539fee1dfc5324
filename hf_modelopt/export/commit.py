"""Committing a finished staging folder as the export in the output folder (`commit_export`), so that a killed or
failed export never looks finished and never costs a user's file.

The files the export may own are noted in `OUTPUT/.hf-modelopt-export-pending.json` (the previous manifest, an
interrupted commit's list and the new manifest, with their hashes); `export.json` is removed; each new file is
renamed into place (replacing the file of that name, nothing else); files of the previous export that the new one
lacks are removed only if they are inside the folder and unchanged since exported (same sha256); `export.json` is
renamed in last. A folder without `export.json` is not a finished export; a killed commit is finished by the next
one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from ..files import UnsafePathError, inside, remove_inside, sha256_file
from .record import EXPORT_RECORD, read_export_record

logger = logging.getLogger("hf_modelopt")

STAGING = ".hf-modelopt-export"  # OUTPUT/.hf-modelopt-export/: the export being written and verified
PENDING = ".hf-modelopt-export-pending.json"  # the files an unfinished commit may have put in OUTPUT/
# Never an export's file, whatever a manifest says: the run's own folders and records.
NOT_EXPORT_FILES = ("stages", ".hf-modelopt")


def staging_dir(output_dir: Path) -> Path:
    return Path(output_dir) / STAGING


def _hashes(entry) -> set[str]:
    """The sha256 values a manifest entry allows: `{"size", "sha256"}` (export.json), a list (pending file);
    none for an older export.json's bare sizes, whose files are then never removed."""
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
        return {entry["sha256"]}
    if isinstance(entry, list):
        return {item for item in entry if isinstance(item, str)}
    return set()


def _owned_files(output_dir: Path) -> dict[str, set[str]]:
    """Files the export may own in `output_dir`, with the hashes it wrote them with: the previous export's
    manifest and the list of an interrupted commit."""
    owned: dict[str, set[str]] = {}
    pending = None
    try:
        pending = json.loads((output_dir / PENDING).read_text())
    except (OSError, ValueError):
        pass
    for source in (read_export_record(output_dir), pending):
        files = source.get("files") if isinstance(source, dict) else None
        for name, entry in (files.items() if isinstance(files, dict) else ()):
            if isinstance(name, str):
                owned.setdefault(name, set()).update(_hashes(entry))
    return owned


def _remove_if_unchanged(output_dir: Path, name: str, hashes: set[str]) -> None:
    """Remove a file of an earlier export if it is inside `output_dir`, a regular file and unchanged since it
    was exported; then the folders it leaves empty (plots/). Anything else stays, with a log line."""
    try:
        path = inside(output_dir / name, output_dir)
    except UnsafePathError:
        logger.warning("export.json lists %r, which is outside %s: left alone", name, output_dir)
        return
    if path.is_symlink() or not path.is_file() or path.relative_to(output_dir).parts[0].startswith(NOT_EXPORT_FILES):
        return  # gone, replaced by the user (a link, a folder), or never an export's file
    if sha256_file(path) not in hashes:
        logger.info("export: kept %s: it is not the file the previous export wrote (changed since, or recorded "
                    "without a hash by an older version)", name)
        return
    remove_inside(path, output_dir)
    folder = path.parent
    while folder != output_dir and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _write_json(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def commit_export(staging: Path, output_dir: Path) -> None:
    """Make the finished `staging` folder (inside `output_dir`) the export in `output_dir` (module docstring, 3.)."""
    output_dir = Path(output_dir).resolve()
    staging = Path(staging)
    new = read_export_record(staging)["files"]
    # Every target first, before anything changes: an export file never goes outside the folder, through a
    # symlinked folder, nor in place of a folder the user has there.
    targets = {}
    for name in new:
        target = inside(output_dir / name, output_dir)
        if target.is_dir() and not target.is_symlink():
            raise UserError(f"{target}: a folder is where the export writes its file {name}; move it away and "
                            "export again (--rerun-from export)")
        blocking = next((p for p in target.relative_to(output_dir).parents if (output_dir / p).is_file()), None)
        if blocking is not None:
            raise UserError(f"{output_dir / blocking}: a file is where the export needs a folder (for {name}); move "
                            "it away and export again (--rerun-from export)")
        targets[name] = target
    owned = _owned_files(output_dir)
    for name, entry in new.items():
        owned.setdefault(name, set()).update(_hashes(entry))
    _write_json(output_dir / PENDING, {"files": {name: sorted(hashes) for name, hashes in owned.items()}})
    remove_inside(EXPORT_RECORD, output_dir)  # first: from here on the folder is no finished export
    for name, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
    for name, hashes in owned.items():
        if name not in new:
            _remove_if_unchanged(output_dir, name, hashes)
    os.replace(staging / EXPORT_RECORD, output_dir / EXPORT_RECORD)  # last: the export is complete
    remove_inside(PENDING, output_dir)
    remove_inside(staging, output_dir)

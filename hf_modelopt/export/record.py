"""`export.json`: the record of a finished export, written last (a folder without it is not a finished export)."""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_RECORD = "export.json"


def read_export_record(folder) -> dict | None:
    """The `export.json` of a finished export in `folder`, or None."""
    try:
        return json.loads((Path(folder) / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None

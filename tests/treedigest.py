"""A full digest of a directory tree, to compare trees built in different ways (standard library only).

Run as a script (`python3 tests/treedigest.py DIR`) it prints the digest as JSON: tests run it inside a
mount namespace of their own, on an overlay mount only that namespace has.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from typing import Any


def digest(root: str) -> dict[str, Any]:
    """Every entry below `root` (and `root` itself, as "."): type, mode, owner, mtime, size, content hash,
    link target, device numbers, xattrs (ACLs included), and which hard-link group it is in (the first
    name of its inode, in sorted order)."""
    entries: dict[str, Any] = {}
    first_name: dict[tuple[int, int], str] = {}
    paths = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    for relative in sorted(paths):
        path = os.path.join(root, relative)
        st = os.lstat(path)
        entry: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                                 "uid": st.st_uid, "gid": st.st_gid}
        if not stat.S_ISLNK(st.st_mode):
            entry["mtime"] = st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                entry["sha256"] = hashlib.sha256(f.read()).hexdigest()
            entry["size"] = st.st_size
            entry["links"] = first_name.setdefault((st.st_dev, st.st_ino), relative)
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        entry["xattrs"] = {name: os.getxattr(path, name, follow_symlinks=False).hex()
                           for name in sorted(os.listxattr(path, follow_symlinks=False))}
        entries[relative] = entry
    return entries


if __name__ == "__main__":
    json.dump(digest(sys.argv[1]), sys.stdout, sort_keys=True)

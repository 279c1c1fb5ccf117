"""Export marks: what an export left at OUTDIR/NAME, so the same export again can leave it there untouched.

A fully cached rebuild that exports a 225 MB qcow2 into the directory that holds it from the last run would
copy it again (0.1-0.5 s on tmpfs, which has no reflinks): that copy was all its time beyond start-up. So
after each export the store keeps a mark (`STORE/exports/<digest of the target's path>.json`): the tree id
exported and a digest of the identity of every entry of the copy as it was left there (relative path,
device, inode, mode, owner, size, mtime and ctime, in nanoseconds). The next export of the same tree to
the same target skips the copy only when a walk of the target gives the same digest.

ctime is what makes this safe: a write, truncate, chmod, chown, xattr change, link or rename of an entry
sets it to the current time and no call can set it back; an entry added or removed changes its
directory's, and the set of names. An exported image the user booted and changed is copied again from the
store, and the copy is a new inode, as every export is (a skipped one was copied by an earlier export).
A filesystem whose clock ticks coarsely gives a write in the same tick as the copy's last change the same
ctime, so `remember` returns only once the coarse clock has passed the newest ctime it recorded (`settle`):
any write after the export is done is seen. Writes while aosbuild is still exporting race the export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SETTLE_BOUND = 0.1  # seconds to wait for the clock to pass the copy's ctime; then no mark is kept
CLOCK_REALTIME_COARSE = 5  # Linux's; the clock file times are taken from (Python's time module lacks it)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportMark:
    """The mark an export of the tree `tree` from the store at `store` leaves."""

    store: Path
    tree: str

    def path(self, target: Path) -> Path:
        where = os.path.join(os.path.realpath(target.parent), target.name)
        return self.store / "exports" / f"{hashlib.sha256(os.fsencode(where)).hexdigest()}.json"

    def holds(self, target: Path) -> bool:
        """Whether `target` is exactly what exporting this tree there left, untouched since."""
        try:
            mark = json.loads(self.path(target).read_bytes())
        except (OSError, ValueError):
            return False
        if not isinstance(mark, dict) or mark.get("tree") != self.tree:
            return False
        found = identity(target)
        return found is not None and found[0] == mark.get("identity")

    def remember(self, target: Path) -> None:
        """Mark `target` as this tree's export, as it is now. No mark (and the old one gone) if the
        target cannot be walked, the mark cannot be written or the clock does not pass its newest ctime
        in time: the mark only saves a copy, the export is done either way."""
        mark = self.path(target)
        tmp = mark.with_name(f".{mark.name}.tmp-{uuid.uuid4().hex}")
        try:
            with contextlib.suppress(FileNotFoundError):
                mark.unlink()  # a target replaced meanwhile never keeps the mark of what was there before
            found = identity(target)
            if found is None or not settle(found[1]):
                return
            mark.parent.mkdir(exist_ok=True)
            tmp.write_text(json.dumps({"tree": self.tree, "identity": found[0]}))
            os.rename(tmp, mark)  # whole or not at all, for concurrent exports and readers
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def identity(target: Path) -> tuple[str, int] | None:
    """A digest of every entry under `target` (itself included) and the newest ctime among them; None if
    `target` is not a directory (a symlink is not followed) or cannot be walked."""
    digest = hashlib.sha256()
    newest = 0
    try:
        top = os.lstat(target)
        if not stat.S_ISDIR(top.st_mode):
            return None
        todo: list[tuple[str, os.stat_result]] = [(".", top)]
        while todo:
            relative, st = todo.pop()
            digest.update(f"{relative}\0{st.st_dev} {st.st_ino} {st.st_mode} {st.st_uid} {st.st_gid} "
                          f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n".encode("utf-8", "surrogateescape"))
            newest = max(newest, st.st_ctime_ns)
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(os.path.join(target, relative)) as entries:
                    children = sorted((entry.name, entry.stat(follow_symlinks=False)) for entry in entries)
                todo.extend((os.path.join(relative, name), child) for name, child in reversed(children))
    except OSError:
        return None
    return digest.hexdigest(), newest


def settle(newest_ctime_ns: int) -> bool:
    """Wait until the coarse clock is more than a millisecond past `newest_ctime_ns`, so that a file time
    taken later, truncated to a filesystem's granularity of up to 1 ms, is later than it; false if that
    takes more than SETTLE_BOUND or the filesystem's times are a whole number of milliseconds (FAT, for
    one: a write within the same 2 seconds would keep its time)."""
    if newest_ctime_ns % 1_000_000 == 0:
        return False
    tick = time.clock_getres(CLOCK_REALTIME_COARSE)
    deadline = time.monotonic() + SETTLE_BOUND
    while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= newest_ctime_ns + 1_000_000:
        if time.monotonic() > deadline:
            return False
        time.sleep(tick)
    return True

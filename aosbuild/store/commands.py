"""`aosbuild store info|prune|clear|limit|verify`: the store, for the people who run it.

- `info`: size, entries and limits; which entries are in use; staging entries of running and dead builds
- `prune --to SIZE`: evict least recently used trees down to SIZE (and sources down to their bound)
- `clear`: remove every tree and source item, also from a store of another format (the way out of a
  format mismatch); refused while a build is running
- `limit`: show or set the bounds (as `--cache-max-size` does for the trees), and prune to new ones
- `verify`: check every entry's structure and every source item's checksum; remove what is damaged
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..entry import broken_pipe
from ..errors import StoreError
from ..history import History
from ..sizes import Bound, format_size, size_argument
from . import entries, sourcecache
from .fscache import KEEP, VERSION, Store
from .locks import UNLOCK, WRITE, LockFile, holder
from .sizes import bound_from_json, bound_to_json, disk_usage


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aosbuild store", description="Look after an aosbuild store.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--store", "--cache", dest="store", default=".osbuild", metavar="DIR",
                         help="the store (default: .osbuild)")
        return sub

    info = command("info", "show the size, entries and limits of the store")
    info.add_argument("--json", action="store_true", help="as JSON")
    prune = command("prune", "evict least recently used trees (and source items) down to a size")
    prune.add_argument("--to", required=True, type=size_argument, metavar="SIZE",
                       help="what the trees may take afterwards (e.g. 5GiB; 0 evicts all not in use)")
    prune.add_argument("--sources-to", type=size_argument, default=KEEP, metavar="SIZE",
                       help="what the source items may take afterwards (default: their bound)")
    command("clear", "remove every tree and source item; also makes a store of another format usable")
    limit = command("limit", "show or set the bounds of the store (kept for every later build)")
    limit.add_argument("--cache-max-size", type=size_argument, default=KEEP, metavar="SIZE",
                       help="bound of the trees: bytes, kB, KiB, MB, MiB, GB, GiB, TB, TiB or 'unlimited'")
    limit.add_argument("--sources-max-size", type=size_argument, default=KEEP, metavar="SIZE",
                       help="bound of the source items, in the same units")
    remote = command("remote", "show or set the remote caches (OCI registries) every build on the store uses")
    remote.add_argument("refs", nargs="*", metavar="REF",
                        help="HOST[:PORT]/REPOSITORY, repeatable: the first is pushed to, all are read")
    remote.add_argument("--push", choices=("none", "pipelines", "all"), default=None,
                        help="what builds push after they succeed (default: pipelines, each pipeline's final stage)")
    remote.add_argument("--insecure", action="store_true", help="plain HTTP to registries not on loopback")
    remote.add_argument("--clear", action="store_true", help="use no remote cache any more")
    verify = command("verify", "check every tree entry and source item, and remove the damaged ones")
    verify.add_argument("--json", action="store_true", help="as JSON")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    root = Path(args.store).absolute()
    try:
        if args.command == "clear":
            return clear(root)
        if args.command not in ("limit", "remote") and not (root / "cache.info").exists():  # a new store takes settings
            raise StoreError(f"{root} is not an aosbuild store (it has no cache.info): check --store; a build "
                             "makes the store it is given")
        if args.command == "info":
            return info(root, as_json=args.json)
        store = Store.open(root, use=False)
        if args.command == "prune":
            return prune(store, args.to, args.sources_to)
        if args.command == "limit":
            return limit(store, args.cache_max_size, args.sources_max_size)
        if args.command == "verify":
            return verify(store, as_json=args.json)
        if args.command == "remote":
            return remote(store, refs=tuple(args.refs), push=args.push, insecure=args.insecure, clear=args.clear)
    except StoreError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    except BrokenPipeError:  # `aosbuild store info | head -1`: an OSError, but nothing to report
        return broken_pipe()
    except OSError as exc:
        sys.stderr.write(f"Error: {exc.filename or root}: {exc.strerror}; store commands take the store's locks "
                         "and remove what they report: run them where the store can be written (as root)\n")
        return 1
    raise AssertionError(args.command)


def _in_use(lock_path: Path) -> bool:
    """Whether somebody holds a lock on the file (a reader of an entry, a build of the store)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return holder(fd, WRITE) != UNLOCK
    finally:
        os.close(fd)


def describe(root: Path) -> dict[str, Any]:
    """Everything `info` shows, as a JSON-able dict; reads the store without changing it."""
    store = Store(root)
    document: dict[str, Any] = {"store": str(root), "version": store.read_info().get("version"),
                                "supported-version": VERSION}
    if document["version"] != VERSION:
        return document
    limits = store.limits()
    committed = entries.list_committed(store.objects)
    items = sourcecache.items(store.sources)
    staging = [store.staging / n for n in os.listdir(store.staging)] + [store.tmp / n for n in os.listdir(store.tmp)]
    live = [p for p in staging if _in_use(p / entries.LOCK)]
    fs = os.statvfs(root)
    document.update({
        "running-builds": _in_use(root / "cache.lock"),
        "trees": {"entries": len(committed), "size": sum(c.size for c in committed),
                  "maximum-size": bound_to_json(limits.max_size), "configured": limits.max_size_configured},
        "sources": {"items": len(items), "size": sum(i.size for i in items),
                    "maximum-size": bound_to_json(limits.sources_max_size),
                    "configured": limits.sources_max_size_configured},
        "staging": {"building": len(live), "dead": len(staging) - len(live),
                    "size": sum(disk_usage(p) for p in staging)},
        "filesystem": {"size": fs.f_blocks * fs.f_frsize, "free": fs.f_bavail * fs.f_frsize},
        "remote": store.remote_config(),  # `aosbuild store remote`: {"refs", "push", "insecure"} or None
        "entries": [{"id": c.id, "size": c.size, "last-used": c.last_used, "created": c.created,
                     "layers": list(c.layers), **_made_by(store.objects / c.id),
                     "in-use": _in_use(store.objects / c.id / entries.LOCK),
                     "damaged": entries.damage(store.objects / c.id)} for c in reversed(committed)],
    })
    document["trees"]["stacks"] = stacks(document["entries"])
    return document


def _made_by(path: Path) -> dict[str, Any]:
    """The pipeline and stage type that made an entry (its last stage result), as far as it says."""
    try:
        info = json.loads((path / entries.INFO).read_text())
        results = json.loads((path / "data" / "meta" / entries.RESULTS).read_text())
        stage = str(results[-1].get("type", "")) if results else ""
        return {"pipeline": str(info.get("pipeline", "")), "stage": stage}
    except (OSError, ValueError, AttributeError, TypeError):
        return {"pipeline": "", "stage": ""}


def stacks(listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trees the store holds, one per top layer (one that no other entry stacks on: a pipeline's
    tree, or where a build stopped), most recently used first, with their layers bottom first."""
    by_id = {e["id"]: e for e in listed}
    below = {i for e in listed for i in e["layers"]}
    found = []
    for top in listed:
        if top["id"] in below:
            continue
        layers = [by_id.get(i, {"id": i, "size": 0, "stage": "", "missing": True}) for i in top["layers"]]
        layers = [*layers, top]
        found.append({"pipeline": top["pipeline"], "id": top["id"], "size": sum(e["size"] for e in layers),
                      "complete": not any(e.get("missing") for e in layers),
                      "layers": [{"id": e["id"], "stage": e["stage"], "size": e["size"]} for e in layers]})
    return found


def info(root: Path, *, as_json: bool) -> int:
    document = describe(root)
    if as_json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return 0
    if document["version"] != VERSION:
        sys.stdout.write(f"Store {root}: format {document['version']}, this aosbuild reads format {VERSION}.\n"
                         f"`aosbuild store clear --store {root}` empties it for this aosbuild.\n")
        return 1

    def count(number: int, noun: str, nouns: str = "") -> str:
        return f"{number} {noun if number == 1 else nouns or noun + 's'}"

    def bound(section: dict[str, Any], default: str) -> str:
        text = format_size(bound_from_json(section["maximum-size"]))
        return text if section["configured"] else f"{text} (default: {default})"

    trees, sources, staging, fs = document["trees"], document["sources"], document["staging"], document["filesystem"]
    lines = [f"Store {root} (format {VERSION})",
             f"  trees:       {count(trees['entries'], 'entry', 'entries')}, {format_size(trees['size'])} of "
             f"{bound(trees, '20 GiB or half the filesystem')}",
             f"  sources:     {count(sources['items'], 'item')}, {format_size(sources['size'])} of "
             f"{bound(sources, '10 GiB or a quarter of the filesystem')}",
             f"  builds:      {'running' if document['running-builds'] else 'none running'}; "
             f"{count(staging['building'], 'entry', 'entries')} under construction, {staging['dead']} left by dead "
             f"builds ({format_size(staging['size'])})",
             f"  filesystem:  {format_size(fs['free'])} free of {format_size(fs['size'])}"]
    remote = document["remote"] or {}
    if remote.get("refs"):
        lines.append(f"  remote:      {', '.join(remote['refs'])} (the first pushed to; push {remote.get('push')})")
    if trees["stacks"]:
        lines += ["", "Trees by pipeline, most recently used first (their layers bottom first):"]
        for stack in trees["stacks"]:
            lines.append(f"  {stack['pipeline'] or '?'}: {count(len(stack['layers']), 'layer')}, "
                         f"{format_size(stack['size'])}" + ("" if stack["complete"] else " (a layer is gone: a miss)"))
            for layer in stack["layers"]:
                lines.append(f"    {layer['id'][:12]}  {format_size(layer['size']):>10}  {layer['stage'] or '?'}")
    if document["entries"]:
        lines += ["", "Entries, most recently used first:"]
        for entry in document["entries"]:
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["last-used"]))
            lines.append(f"  {entry['id']}  {format_size(entry['size']):>10}  used {used}"
                         + ("  (in use)" if entry["in-use"] else "")
                         + (f"  (damaged: {entry['damaged']})" if entry["damaged"] else ""))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def prune(store: Store, to: Bound, sources_to: Bound) -> int:
    dead = entries.reclaim_dead(store.staging) + entries.reclaim_dead(store.tmp)
    damaged = [d for d in verify_entries(store)[1] if d["removed"]]
    if damaged:
        sys.stdout.write(f"trees: removed {len(damaged)} damaged entries\n")
    if to is not None:
        count, freed = store.prune(to)
        sys.stdout.write(f"trees: evicted {count} entries, {format_size(freed)}\n")
    if sources_to is KEEP:
        sources_to = store.limits().sources_max_size
    pruned = store.prune_sources(sources_to)
    if pruned is None:
        sys.stdout.write("sources: not pruned, builds are running (the last one to end prunes them)\n")
    else:
        sys.stdout.write(f"sources: removed {pruned[0]} items, {format_size(pruned[1])}\n")
    if dead:
        sys.stdout.write(f"staging: removed {dead} entries left by dead builds\n")
    streams = History(store.root).prune()
    if streams:
        sys.stdout.write(f"history: removed {streams} saved build streams beyond the bound\n")
    return 0


def limit(store: Store, max_size: Bound, sources_max_size: Bound) -> int:
    """Set the limits and prune to them at once; without arguments, show them."""
    if max_size is not KEEP or sources_max_size is not KEEP:
        store.set_limits(max_size=max_size, sources_max_size=sources_max_size)
    limits = store.limits()
    if max_size is not KEEP and limits.max_size is not None:
        store.prune(limits.max_size)
    if sources_max_size is not KEEP:
        store.prune_sources(limits.sources_max_size)
    sys.stdout.write(f"trees:   {format_size(limits.max_size)}{'' if limits.max_size_configured else ' (default)'}\n"
                     f"sources: {format_size(limits.sources_max_size)}"
                     f"{'' if limits.sources_max_size_configured else ' (default)'}\n")
    return 0


def remote(store: Store, *, refs: tuple[str, ...], push: str | None, insecure: bool, clear: bool) -> int:
    """Set the store's remote caches (with REFs, `--push` or `--insecure`) or clear them; show them."""
    from ..registry import RegistryError
    from ..remotecache import check_ref
    from ..remotesettings import RemoteSettings

    if clear:
        store.set_remote_config(None)
    elif refs or push or insecure:
        current = RemoteSettings.from_json(store.remote_config())
        try:
            checked = tuple(check_ref(ref) for ref in refs) or current.refs
        except RegistryError as exc:
            sys.stderr.write(f"Error: {exc}\n")
            return 2
        store.set_remote_config(RemoteSettings(refs=checked, push=push or current.push,
                                               insecure=insecure or current.insecure).to_json())
    settings = RemoteSettings.from_json(store.remote_config())
    if not settings.refs:
        sys.stdout.write("remote: none\n")
        return 0
    for n, ref in enumerate(settings.refs):
        sys.stdout.write(f"remote: {ref}{' (pushed to)' if n == 0 else ''}\n")
    sys.stdout.write(f"push:   {settings.push}\n" + ("insecure: yes\n" if settings.insecure else ""))
    return 0


def verify_entries(store: Store) -> tuple[int, list[dict[str, Any]]]:
    """Check every committed entry's structure; (entries checked, the damaged ones)."""
    checked, damaged = 0, []
    for name in sorted(os.listdir(store.objects)):
        problem = entries.damage(store.objects / name)
        if problem is not None and not (store.objects / name).exists():
            continue  # evicted meanwhile
        if problem is not None and entries.being_checked(store.objects, name):
            continue  # a bottom layer a running build is checking: not ready yet, not damaged
        checked += 1
        if problem is not None:
            removed = entries.discard_damaged(store.objects, name)
            damaged.append({"id": name, "problem": problem, "removed": removed})
    return checked, damaged


def verify_sources(store: Store) -> tuple[int, list[dict[str, Any]]]:
    """Hash every source item; (items checked, the damaged ones). Items being fetched are left alone."""
    checked, damaged = 0, []
    for found in sourcecache.items(store.sources):
        item = found.path
        if found.is_dir:
            continue  # an osbuild source's image or repository: that source checks it when it is used
        with sourcecache.try_lock(item) as held:
            if not held:
                continue
            try:
                problem = sourcecache.check(item, item.name, full=True)
            except FileNotFoundError:
                continue
            except ValueError:
                continue  # not named by a checksum: not an item of a type aosbuild checks
            checked += 1
            if problem is not None:
                sourcecache.discard(item)
                damaged.append({"type": item.parent.name, "checksum": item.name, "problem": problem,
                                "removed": True})
    return checked, damaged


def verify(store: Store, *, as_json: bool) -> int:
    """Exit 0 if everything is good, 1 if something was damaged (removed, unless a build reads it)."""
    checked, damaged = verify_entries(store)
    items, bad_items = verify_sources(store)
    if as_json:
        document = {"store": str(store.root), "entries": {"checked": checked, "damaged": damaged},
                    "sources": {"checked": items, "damaged": bad_items}}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        lines = [f"trees: {checked} entries checked, {len(damaged)} damaged"]
        lines += [f"  {d['id']}: {d['problem']}; "
                  + ("removed" if d["removed"] else "not removed: a build is using it") for d in damaged]
        lines.append(f"sources: {items} items checked, {len(bad_items)} damaged")
        lines += [f"  {d['type']}/{d['checksum']}: {d['problem']}; removed" for d in bad_items]
        sys.stdout.write("\n".join(lines) + "\n")
    return 1 if damaged or bad_items else 0


def clear(root: Path) -> int:
    """Remove every tree, source item and staging entry; keep the limits. Works on any store format."""
    if not ((root / "cache.info").exists() or (root / "CACHEDIR.TAG").exists()):
        raise StoreError(f"{root} does not look like a store (no cache.info, no CACHEDIR.TAG): not touching "
                         "it; check --store")
    in_use = LockFile.try_open(root / "cache.lock", WRITE, create=True)
    if in_use is None:
        raise StoreError(f"builds are running on {root}: clear it when they have finished")
    try:
        size_lock = LockFile.wait_open(root / "size.lock", WRITE)
        try:
            store = Store(root)
            for d in (store.staging, store.tmp):
                d.mkdir(exist_ok=True)
            trash = entries.create(store.tmp)  # if this process dies, the next build removes what is left
            for name in ("objects", "sources", "stage"):
                if (root / name).exists():
                    os.rename(root / name, trash.path / "data" / name)
            for name in os.listdir(store.tmp):
                if store.tmp / name != trash.path:
                    os.rename(store.tmp / name, trash.path / "data" / f"tmp-{name}")
            (root / "cache.size").unlink(missing_ok=True)  # osbuild's size counter
            _reset_info(root)
            store.create_layout()
        finally:
            size_lock.close()
    finally:
        in_use.close()
    entries.remove(trash)
    sys.stdout.write(f"cleared {root}\n")
    return 0


def _reset_info(root: Path) -> None:
    """cache.info of this format, with the limits of the old one where they can be read."""
    try:
        old = json.loads((root / "cache.info").read_text())
    except (OSError, ValueError):
        old = {}
    info: dict[str, Any] = {"version": VERSION}
    for key in ("maximum-size", "sources-maximum-size"):
        try:
            if isinstance(old, dict) and key in old:
                info[key] = bound_to_json(bound_from_json(old[key]))
        except ValueError:
            pass
    tmp = root / ".cache.info-new"
    tmp.write_text(json.dumps(info))
    os.rename(tmp, root / "cache.info")

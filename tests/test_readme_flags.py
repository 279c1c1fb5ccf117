"""Every flag in README.md's tables is driven by at least one test that runs the command line.

A flag counts as driven when some test file other than this one has it as a string literal of its own
(`"--flag"`, or `"--flag=..."`): an element of an argv list that a test runs (`python -m aosbuild ...`).
"""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import REPO, TESTS

FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")


def readme_table_flags() -> dict[str, str]:
    """flag -> the table row it is first named in (any column: `--refresh` is told of in `--cache`'s),
    for every table whose first column is `flag` or `command`."""
    flags: dict[str, str] = {}
    in_table = False
    for line in (REPO / "README.md").read_text().splitlines():
        if re.match(r"^\| (flag|command) \|", line):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if in_table and not line.startswith("|---"):
            for flag in FLAG.findall(line.replace("\\|", "/")):
                flags.setdefault(flag, line.split("|")[1].strip())
    return flags


def test_the_tables_hold_flags() -> None:
    flags = readme_table_flags()
    # one from each table: the build's, the store commands', depsolve's
    assert {"--store", "-j", "--sources-to", "--no-updates", "--recommends", "--refresh"} <= set(flags)


def test_every_flag_in_the_readme_is_used_by_a_test() -> None:
    own = Path(__file__).resolve()
    text = "\n".join(p.read_text() for p in TESTS.rglob("*.py") if p.resolve() != own)
    unused = {flag: row for flag, row in readme_table_flags().items()
              if not re.search(rf"""["']{re.escape(flag)}(["'=])""", text)}
    assert unused == {}

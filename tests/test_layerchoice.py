"""Which layers a pushed stage image is made of (the builds that push them: tests/test_remotecache.py)."""

from __future__ import annotations

from aosbuild.layerchoice import flatten_point


def test_a_stack_is_flattened_where_it_has_no_oci_form_or_writes_the_same_files_again() -> None:
    disk = 2 << 30
    # a disk image copied up whole by every stage: one layer instead of four
    assert flatten_point([(False, {"disk.img": disk})] * 4) == 3
    # a build root and small changes to it: layers stay layers
    assert flatten_point([(False, {"usr/bin/bash": 300 << 20, "etc/hostname": 5}), (False, {"etc/hostname": 6}),
                          (False, {"etc/motd": 3})]) == -1
    # a renamed directory (a redirect): flattened up to it, the layers above kept
    assert flatten_point([(False, {}), (True, {}), (False, {"data": 5 << 20})]) == 1
    # the same file written again, but too few bytes to be worth it
    assert flatten_point([(False, {"a": 10}), (False, {"a": 10})]) == -1

"""The sandbox side: the code stages and runners import inside the sandbox (standard library only).

This directory, and nothing else of aosbuild, is bind-mounted into every stage's sandbox at
`/run/osbuild/lib/aosbuild`, so there it *is* the package `aosbuild`: a stage writes
`from aosbuild import stageapi` and a runner `from aosbuild import runnerlib`, while the engine imports the
same files as `aosbuild.sandboxside.*`. It runs on the build root's own python3, which has none of the
engine's dependencies and no engine module to import, so its modules import only the standard library and
each other, and only relatively (`from . import stageapi`), which works under both names
(`tests/test_sandboxside.py` checks this).
"""

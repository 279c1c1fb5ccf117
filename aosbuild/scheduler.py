"""Running a plan's steps as a DAG: all at once, each after the steps it waits for, in `--jobs` slots.

What to build is decided by `planner.py`, before anything runs; this module only runs it. Every step starts
at once and waits for exactly the steps its pipeline needs, then for one of the slots; the sources are
fetched meanwhile, and each stage waits for its own items. The first failure cancels everything else:
running steps are cancelled, and the steps waiting for others never start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio

from .builder import build_pipeline
from .context import BuildContext
from .planner import Plan, Step

Build = Callable[[Step], Awaitable[None]]


async def run(ctx: BuildContext, plan: Plan) -> None:
    """Fetch sources and build the plan's pipelines, each as soon as what it needs is ready."""

    async def build(step: Step) -> None:
        await build_pipeline(ctx, step.pipeline, step.resume)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ctx.sources.fetch_all)
        await run_steps(plan.build, build, jobs=ctx.options.jobs)


async def run_steps(steps: Sequence[Step], build: Build, *, jobs: int) -> None:
    """Run `build` for every step once the steps it waits for are built, at most `jobs` at a time."""
    built = {step.id: anyio.Event() for step in steps}
    slots = anyio.CapacityLimiter(jobs)

    async def build_one(step: Step) -> None:
        for dep in sorted(step.waits_for):
            await built[dep].wait()
        async with slots:
            await build(step)
        built[step.id].set()

    async with anyio.create_task_group() as tg:
        for step in steps:
            tg.start_soon(build_one, step)

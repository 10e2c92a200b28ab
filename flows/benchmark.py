"""The `benchmark` flow, listed beside the other flows; its code lives in `benchmarks/flow.py`.

Why there: the flow's body is benchmark code (workload, runner, gpu_targets.json merge, chart), and the
layering lets `benchmarks/` import flows, tasks and the engine but keeps `flows/` thin and built on
`tasks/`. This alias is the one place `flows/` names `benchmarks/`; it adds no logic. A deployment may use
either entrypoint: `benchmarks/flow.py:benchmark` or `flows/benchmark.py:benchmark`.
"""

from benchmarks.flow import benchmark, queue_for

__all__ = ["benchmark", "queue_for"]

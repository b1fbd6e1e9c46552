"""The planner: model shapes, the cost model, stage partitioning, per-parallelism evaluation, plans.

Pure functions of plain data: no I/O, no asyncssh, no torch."""

"""Flax modules for the benchmarks, and the glue that turns an encoder and task heads into
the pure functions the train step takes (`multitask.task_functions`)."""

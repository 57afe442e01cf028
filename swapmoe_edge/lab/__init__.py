"""Measuring and research: traces, replay, hindsight, evaluation, sweeps, benchmarks, the device box."""

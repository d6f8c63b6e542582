"""CUDA-event timing shared by the quick GPU scripts (``quick_splits.py``, ``profile_step.py``,
``kernel_overhead.py``); the harness ``bench_attention.py`` has its own, collective-aware loop."""
import statistics

import torch


def events_ms(fn) -> float:
    """Milliseconds of device time for one call of ``fn``, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def median_ms(fn, warmup: int, repeats: int) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(events_ms(fn) for _ in range(repeats))

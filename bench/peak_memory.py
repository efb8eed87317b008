"""Peak memory for the benchmarks: the most GPU memory torch allocated on a CUDA device
(`torch.cuda.max_memory_allocated`, resettable per part), else the process's peak resident set
size (`ru_maxrss`, which only grows: a later part's figure includes the earlier parts')."""

from __future__ import annotations

import resource

import torch


def reset_peak(device: torch.device | str) -> None:
    """Start a new peak on a CUDA device (nothing to reset for the CPU's RSS)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device | str) -> float:
    """Peak memory in MiB since the last reset_peak (CUDA) or since the process started (CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_label(device: torch.device | str) -> str:
    return "peak GPU memory (max allocated)" if torch.device(device).type == "cuda" else "peak RSS"


def peak_text(device: torch.device | str) -> str:
    """e.g. 'peak RSS 2140 MiB' or 'peak GPU memory (max allocated) 16400 MiB'."""
    return f"{peak_label(device)} {peak_mib(device):.0f} MiB"

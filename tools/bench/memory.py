"""Peak memory of one step of a row, above what the models already hold.

CUDA: ``torch.cuda.max_memory_allocated`` around one step, in this process.

CPU (Linux): a fresh forked process per row fixes glibc's mmap threshold (so that a tensor's
memory returns to the system when it is freed), builds the workload, runs the row once (so
gradients and optimizer state exist), returns freed memory to the system (``malloc_trim``),
resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs the row again and reports
VmHWM - VmRSS: the peak resident memory of one steady-state step above the memory held between
steps (weights, gradients, optimizer state). Forking before the parent has run any model keeps
each child's heap fresh; a fresh process per row keeps one row's freed memory from serving the
next.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import multiprocessing
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

CUDA_METHOD = "torch.cuda.max_memory_allocated during one step minus memory allocated before it"
CPU_METHOD = (
    "peak RSS of one steady-state step minus RSS before it (after one warm-up step and malloc_trim; "
    "allocations over 64 KiB mmapped), Linux /proc/self/status VmHWM reset through /proc/self/clear_refs, "
    "one fresh forked process per row"
)
_CLEAR_REFS = Path("/proc/self/clear_refs")
MiB = 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def cpu_method_available() -> Optional[str]:
    """None when CPU peak memory can be measured here, else why not."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (/proc/self/clear_refs and VmHWM)"
    try:
        _CLEAR_REFS.write_text("5")
    except OSError as error:
        return f"cannot reset the peak-RSS mark through {_CLEAR_REFS}: {error}"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "needs the fork start method"
    return None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc: hand free heap pages back to the system
            libc.malloc_trim(0)


def _fixed_mmap_threshold() -> None:
    """glibc: serve every allocation over 64 KiB with its own mmap, returned to the system on
    free. By default glibc raises that threshold as blocks are freed and then carves tensors
    out of its heap, where fragmentation makes the peak RSS of a step vary from run to run."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and hasattr(ctypes.CDLL(libc_name), "mallopt"):
        ctypes.CDLL(libc_name).mallopt(_M_MMAP_THRESHOLD, 64 * 1024)


def _cpu_child(connection, build: Callable, run: Callable) -> None:
    try:
        _fixed_mmap_threshold()
        workload = build()
        run(workload)  # warm-up: gradients, optimizer state, lazily built distillers
        _release_freed_memory()
        _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
        run(workload)
        connection.send(("ok", (_status_kib("VmHWM") - before) * 1024))
    except BaseException as error:  # report, never hang the parent
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def cpu_peak_bytes(build: Callable, run: Callable) -> int:
    """Peak RSS growth of one step of ``run(build())``, measured in a fresh forked process."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_cpu_child, args=(sender, build, run))
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the memory-measuring process died (exit code {process.exitcode})") from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"the memory-measuring process failed: {value}")
    return value


def cuda_peak_bytes(workload, run: Callable) -> int:
    """Peak CUDA memory of one step of ``run(workload)`` above what was allocated before it."""
    run(workload)  # warm-up
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run(workload)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before

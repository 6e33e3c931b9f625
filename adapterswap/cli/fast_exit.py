"""Ending the ``adapterswap`` process without the interpreter's teardown.

After a command that loaded torch, diffusers and models, Python's own shutdown (freeing every
module and object one by one, C++ destructors, library unloading) took 3.6 s of a 19.5 s tiny
sweep on the 2-core development machine, and 1.2 s for a script that only imports torch,
diffusers and transformers; nothing of it is work the user asked for: by then the results are
stored and the report written. :func:`fast_exit` does what a normal exit does that matters,
in the same order, then ends the process with :func:`os._exit`:

1. wait for non-daemon threads and run ``threading``'s exit callbacks (what
   ``concurrent.futures`` pools use to finish their queued work), as the interpreter does
   first;
2. run every :mod:`atexit` handler (logging's flush and close, torch's and Ray's shutdowns,
   coverage's data file);
3. flush the standard streams, Python's and the C library's (what C or C++ code printed);
   a flush that fails (a closed pipe) makes a successful exit status 120, as Python's does.

What it skips is the freeing of memory the operating system takes back anyway, C++
destructors and the C library's exit handlers. Tools that write their output then exit the
ordinary way: a Python profiler (``sys.getprofile()`` set: ``python -m cProfile``) or a
process under Nsight Systems, Nsight Compute or compute-sanitizer (their injection
variables); ``ADAPTERSWAP_FULL_EXIT=1`` asks for it too. Only the console entry point uses it
(``adapterswap`` and ``python -m adapterswap``); code that calls :func:`adapterswap.cli.main`
(tests, ``CliRunner``) exits as before.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, NoReturn

#: Modules whose presence makes the interpreter's teardown slow enough to skip.
HEAVY_MODULES = ("torch",)
#: Environment variables of tools that write their output when the process exits normally
#: (Nsight Systems, Nsight Compute and compute-sanitizer inject through CUDA_INJECTION64_PATH).
PROFILER_VARIABLES = ("CUDA_INJECTION64_PATH", "NSYS_PROFILING_SESSION_ID")


def exit_status(code: Any) -> int:
    """``sys.exit``'s rules: ``None`` is 0, an int is itself, anything else is printed to
    stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def wanted() -> bool:
    """Whether to skip the teardown: a heavy module was imported, no profiler waits for the
    ordinary exit and the user did not ask for one."""
    if os.environ.get("ADAPTERSWAP_FULL_EXIT", "").strip() not in ("", "0"):
        return False
    if sys.getprofile() is not None or any(v in os.environ for v in PROFILER_VARIABLES):
        return False
    return any(name in sys.modules for name in HEAVY_MODULES)


def fast_exit(code: Any) -> NoReturn:
    """End the process with ``code`` after the threads, the exit handlers and the streams
    have finished (see the module's text); the interpreter's teardown is skipped."""
    status = exit_status(code)
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:  # non-daemon threads and threading's exit callbacks
        shutdown()
    else:  # pragma: no cover - every CPython this package supports has it
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not stream.closed:  # None: started without it
                stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: as Python's exit says it
            status = status or 120
    try:  # what C and C++ code wrote through the C library's buffers
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no C library to ask
        pass
    os._exit(status)

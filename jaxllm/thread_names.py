"""The OS's name for each of jaxllm's threads (Linux). Python before 3.14 names its threads for Python only, so
/proc/PID/task/*/comm, `top -H` and py-spy see every thread of a process as "python3": from outside a process
(the engine core's, say) there is then no telling which thread uses the CPU. Each of our threads gives its Python
name to the OS as it starts: `threading.Thread(target=os_named(f), name=...)`, or `initializer=name_os_thread`
for a ThreadPoolExecutor's workers."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading

_PR_SET_NAME = 15  # prctl(2): the calling thread's name, at most 15 bytes
_libc = None


def os_name(name: str) -> str:
    """What the OS keeps of a Python thread name: "jaxllm-" shortened to "jx-" (so that the 15 bytes keep what
    tells our threads apart: "jx-frontend-rec" and "jx-frontend-sen"), then the first 15 bytes."""
    if name.startswith("jaxllm-"):
        name = "jx-" + name[len("jaxllm-"):]
    return name.encode("utf-8", "replace")[:15].decode("utf-8", "ignore")


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread's Python name (or `name`) to the OS (`os_name`); nothing off Linux."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    raw = os_name(name or threading.current_thread().name).encode("utf-8")
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)


def os_named(target):
    """`target`, run on a thread that first gives its Python name to the OS."""
    @functools.wraps(target)
    def run(*args, **kwargs):
        name_os_thread()
        return target(*args, **kwargs)
    return run

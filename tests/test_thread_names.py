"""Our threads carry their Python names to the OS, where /proc and profilers read them."""

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from jaxllm.thread_names import name_os_thread, os_named

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names from /proc (Linux)")


def _os_name() -> str:
    return open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip()


def test_a_thread_and_a_pool_worker_are_named_for_the_os():
    seen = {}
    thread = threading.Thread(target=os_named(lambda: seen.setdefault("thread", _os_name())), name="jaxllm-probe")
    thread.start()
    thread.join()
    with ThreadPoolExecutor(1, thread_name_prefix="jaxllm-pool", initializer=name_os_thread) as pool:
        seen["pool"] = pool.submit(_os_name).result()
    assert seen == {"thread": "jx-probe", "pool": "jx-pool_0"}


def test_long_names_keep_what_tells_them_apart():
    seen = []
    for name in ("jaxllm-frontend-receive", "jaxllm-frontend-send", "other-thread-with-a-long-name"):
        thread = threading.Thread(target=os_named(lambda: seen.append(_os_name())), name=name)
        thread.start()
        thread.join()
    assert seen == ["jx-frontend-rec", "jx-frontend-sen", "other-thread-wi"]

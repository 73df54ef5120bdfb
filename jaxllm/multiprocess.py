"""One process per device for `--tp N --nccl_port P`: process 0 (the engine: HTTP, scheduler, detokenizer)
spawns a follower per other device (`python -m jaxllm.multiprocess`), all join jax.distributed (coordinator on
127.0.0.1:P) and build the same model and runner over one global mesh; process 0 then sends each step's device
work (a DeviceStep, a constrained step's masks, a state reset) to the followers over a local socket, and every
process runs the same compiled step. Process 0 alone reads the results."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any

from jaxllm.child import Channel, spawn, wait_or_kill

log = logging.getLogger(__name__)


class FollowerExited(RuntimeError):
    """A follower process is gone: no step can run on the global mesh any more."""


@dataclasses.dataclass
class _Follower:
    process_id: int
    proc: subprocess.Popen
    channel: Channel


class Followers:
    """Process 0's side: the follower processes and their channels. `send` mirrors one piece of device work."""

    def __init__(self, followers: list[_Follower]):
        self._followers = followers
        self._lock = threading.Lock()  # launches and resets come from two threads; messages must not interleave
        self.sent_bytes = 0  # total bytes sent to each follower (the per-step traffic, measured)

    @property
    def processes(self) -> list[subprocess.Popen]:
        """The follower processes, by process id (1, 2, …)."""
        return [f.proc for f in self._followers]

    def check(self) -> None:
        """FollowerExited when a follower has exited: a step on the global mesh would fail or hang."""
        for f in self._followers:
            code = f.proc.poll()
            if code is not None:
                raise FollowerExited(f"process {f.process_id} of the --nccl_port deployment exited (code {code}): "
                                     f"the model's devices are gone; restart the server")

    def send(self, message: tuple) -> None:
        """Send one piece of device work to every follower (FollowerExited if one is gone)."""
        with self._lock:
            self.check()
            for f in self._followers:
                try:
                    size = f.channel.send(message)
                except OSError as exc:
                    raise FollowerExited(f"process {f.process_id} of the --nccl_port deployment is unreachable "
                                         f"({exc}); restart the server") from exc
            self.sent_bytes += size

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the followers and wait for them: each leaves jax.distributed while its coordinator (this process)
        still runs."""
        with self._lock:
            for f in self._followers:
                try:
                    f.channel.send(("stop",))
                except OSError:
                    pass
                f.channel.close()
            for f in self._followers:
                wait_or_kill(f.proc, timeout_s)
            self._followers = []


def initialize(port: int, processes: int, process_id: int) -> None:
    """Join the deployment's jax.distributed (one device per process); before any JAX computation. Task failures
    are recoverable: a dead follower fails steps (Followers.check) instead of aborting process 0."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes,
                               process_id=process_id, local_device_ids=[process_id])


def mesh_devices() -> list:
    """The deployment's devices, one per process (its first), in process order."""
    import jax

    firsts: dict[int, Any] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        firsts.setdefault(d.process_index, d)
    return [firsts[p] for p in sorted(firsts)]


def start(args, warmup: int | None) -> Followers:
    """In process 0, before any JAX computation: spawn a follower per other device, hand each the flags, join
    jax.distributed. The followers load the same model and compile the same steps."""
    followers = []
    for process_id in range(1, args.processes):
        proc, ours = spawn("jaxllm.multiprocess", str(process_id))
        channel = Channel(ours)
        channel.send((args, warmup))
        followers.append(_Follower(process_id, proc, channel))
    result = Followers(followers)
    atexit.register(result.close)  # runs before jax.distributed's own shutdown, registered earlier (LIFO)
    log.info("started %d follower process(es); joining jax.distributed on 127.0.0.1:%d", len(followers),
             args.nccl_port)
    initialize(args.nccl_port, args.processes, 0)
    return result


def follow(runner, channel: Channel) -> None:
    """A follower's loop: run each piece of device work process 0 sends, in order, until "stop" or EOF."""
    pending = None  # a constrained step's sampler inputs, until its masks arrive
    while True:
        try:
            message = channel.receive()
        except EOFError:
            return
        kind = message[0]
        if kind == "stop":
            return
        try:
            if kind == "step":
                pending = runner.execute(message[1])[-1]
            elif kind == "sample":
                runner.execute_sampler(pending, message[1])
                pending = None
            elif kind == "encode":
                runner.encode_images(*message[1:])
            elif kind == "reset":
                runner.reset_device_state()
            else:
                raise ValueError(f"unknown message {kind!r}")
        except Exception:  # noqa: BLE001 - process 0 fails the step too, and resets if the state was lost
            log.exception("process %d: %s failed", os.getpid(), kind)


def main(argv: list[str]) -> int:
    """A follower: `python -m jaxllm.multiprocess FD PROCESS_ID` (spawned by `start`)."""
    from jaxllm.engine.kv_cache import KVCache
    from jaxllm.engine.loading import build_runner, build_scheduler, image_buffer, load_model

    fd, process_id = int(argv[0]), int(argv[1])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [process {process_id}] %(name)s: "
                                                   "%(message)s")
    channel = Channel(socket.socket(fileno=fd))
    args, warmup = channel.receive()
    initialize(args.nccl_port, args.processes, process_id)
    loaded = load_model(args, mesh_devices(), tokenizer=False)
    kv = KVCache(args.max_total_token_num, args.running_max_req_size)
    _, image_rows = image_buffer(args, loaded.model.config)
    runner = build_runner(args, loaded.model, loaded.params, loaded.mesh, kv, build_scheduler(args, kv).max_step_tokens,
                          image_rows=image_rows)
    runner.warmup(warmup)
    log.info("ready: following process 0")
    follow(runner, channel)
    return 0


if __name__ == "__main__":
    from jaxllm.without_torch import hide_torch

    hide_torch()
    sys.exit(main(sys.argv[1:]))

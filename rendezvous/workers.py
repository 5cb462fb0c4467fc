"""``serve --workers N``: N full service instances (processes) accepting on one address.

The supervisor reserves the address (a bound, not listening, ``SO_REUSEPORT`` socket: it takes
no connections, but holds the port, also an ephemeral one) and starts N worker processes
(``spawn``: a fresh interpreter each). Each worker listens on its own ``SO_REUSEPORT`` socket
on that address, and the kernel spreads incoming connections over the workers (by a hash of the
connection's addresses; one shared accept queue instead left nearly everything to one worker).
Each worker is an instance like any other on the shared PostgreSQL database: its own store pool,
instance id and offer listener, so a session offer reaches an agent held by another worker as it
would another host's instance. Metrics go through prometheus_client's multiprocess mode in a
private directory (0700, removed on exit), so ``/metrics`` on any worker reports the whole
service.

No silent half-service: if a worker exits while the service is meant to run, the supervisor
stops the others and exits non-zero, for the init system to restart the whole service. SIGTERM
or SIGINT to the supervisor stops every worker gracefully (Hypercorn's graceful timeout), then
kills stragglers. Workers ignore both signals and stop only when their supervisor closes their
pipe (or disappears: the pipe reaches end of file), so a stop signal sent to the whole process
group — systemd's default, or Ctrl-C in a terminal — still ends in one orderly shutdown instead
of a second signal cutting a worker's graceful shutdown short. SIGHUP to the supervisor is
passed on to every worker, each of which reloads its TLS certificate and key.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

import trio

from rendezvous.config import ServiceConfig, split_listen
from rendezvous.metrics import MULTIPROCESS_DIRECTORY_VARIABLE

logger = logging.getLogger("tucdesk.rendezvous")

LISTEN_BACKLOG = 1024
# Hypercorn's graceful shutdown (3 s) and closing the store (up to 10 s) fit in this.
WORKER_STOP_SECONDS = 15.0
EXIT_OK = 0
EXIT_WORKER_FAILED = 1
METRICS_DIRECTORY_PREFIX = "tucdesk-rendezvous-metrics-"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serve_with_workers(config: ServiceConfig) -> int:
    """Run ``config.workers`` instances on one socket until a signal or a worker's death."""
    config.validate_for_serving()
    refuse_if_in_use(config.listen_host, config.listen_port)
    if config.metrics_listen is not None:
        refuse_if_in_use(*split_listen(config.metrics_listen))
    reservation = reuse_port_socket(config.listen_host, config.listen_port)
    bound_port = reservation.getsockname()[1]
    host = config.listen_host
    worker_config = dataclasses.replace(
        config, listen=f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
    )
    # mkdtemp creates the directory 0700: the metric files are this service's alone.
    metrics_directory = tempfile.mkdtemp(prefix=METRICS_DIRECTORY_PREFIX)
    os.environ[MULTIPROCESS_DIRECTORY_VARIABLE] = metrics_directory
    wake_reader, wake_writer = socket.socketpair()
    wake_writer.setblocking(False)
    stop_signal: list[int] = []

    def on_signal(number: int, _frame: FrameType | None) -> None:
        stop_signal.append(number)
        try:
            wake_writer.send(b"\0")
        except BlockingIOError:
            pass

    workers: list[_Worker] = []

    def on_hangup(_number: int, _frame: FrameType | None) -> None:
        # Each worker reloads its own TLS context (see run_worker).
        for worker in workers:
            if worker.process.pid is not None and worker.process.exitcode is None:
                os.kill(worker.process.pid, signal.SIGHUP)

    previous = {number: signal.signal(number, on_signal) for number in STOP_SIGNALS}
    # Workers start with SIGHUP ignored (an ignored signal stays ignored across exec), so one
    # sent before run_worker runs does not end them; forwarded once all have started.
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        context = multiprocessing.get_context("spawn")
        for index in range(config.workers):
            workers.append(_Worker.start(context, index, worker_config))
        signal.signal(signal.SIGHUP, on_hangup)
        return _supervise(workers, wake_reader, stop_signal)
    finally:
        _stop_all(workers)
        for number, handler in previous.items():
            signal.signal(number, handler)
        wake_reader.close()
        wake_writer.close()
        reservation.close()
        os.environ.pop(MULTIPROCESS_DIRECTORY_VARIABLE, None)
        shutil.rmtree(metrics_directory, ignore_errors=True)


def refuse_if_in_use(host: str, port: int) -> None:
    """Raise OSError if something already listens on ``host:port``.

    ``SO_REUSEPORT`` would let this service silently join another one's port (an old instance
    still running, or an unrelated service of the same user) and split connections with it;
    a plain bind fails on any listening socket, whatever its options.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(
                error.errno, f"cannot listen on {host}:{port}: {error.strerror} (is another "
                "rendezvous still running there?)"
            ) from None


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (not yet listening).

    Only sockets of the same user may join the port's group, as with any ``SO_REUSEPORT`` use.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Worker:
    """One worker process and the write end of the pipe whose closing tells it to stop."""

    def __init__(self, index: int, process: BaseProcess, lifeline: Connection) -> None:
        self.index = index
        self.process = process
        self.lifeline = lifeline

    @classmethod
    def start(
        cls, context: multiprocessing.context.SpawnContext, index: int, config: ServiceConfig
    ) -> _Worker:
        """Start worker ``index`` serving ``config.listen`` (a port the supervisor holds)."""
        lifeline_reader, lifeline_writer = context.Pipe(duplex=False)
        process = context.Process(
            target=run_worker,
            args=(config, lifeline_reader, index),
            name=f"tucdesk-rendezvous-worker-{index}",
        )
        process.start()
        lifeline_reader.close()
        logger.info("worker %d started (pid %s)", index, process.pid)
        return cls(index, process, lifeline_writer)


def _supervise(workers: list[_Worker], wake: socket.socket, stop_signal: list[int]) -> int:
    """Wait for a stop signal (EXIT_OK) or a worker's exit (EXIT_WORKER_FAILED)."""
    sentinels = {worker.process.sentinel: worker for worker in workers}
    while not stop_signal:
        ready = wait([wake, *sentinels])
        for item in ready:
            worker = sentinels.get(item) if isinstance(item, int) else None
            if worker is not None and not stop_signal:
                logger.error(
                    "worker %d (pid %s) exited with code %s; stopping the service",
                    worker.index, worker.process.pid, worker.process.exitcode,
                )  # fmt: skip
                return EXIT_WORKER_FAILED
    logger.info("received %s; stopping %d workers", signal.Signals(stop_signal[0]).name,
                len(workers))  # fmt: skip
    return EXIT_OK


def _stop_all(workers: list[_Worker]) -> None:
    """Tell every worker to stop (close its pipe), wait, kill the ones that do not stop in time."""
    for worker in workers:
        worker.lifeline.close()
    for worker in workers:
        worker.process.join(WORKER_STOP_SECONDS)
        if worker.process.is_alive():
            logger.warning("worker %d did not stop in time; killing it", worker.index)
            worker.process.kill()
            worker.process.join()
        logger.info("worker %d stopped (exit code %s)", worker.index, worker.process.exitcode)
        _forget_worker_metrics(worker)


def _forget_worker_metrics(worker: _Worker) -> None:
    directory = os.environ.get(MULTIPROCESS_DIRECTORY_VARIABLE)
    if directory is not None and worker.process.pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.process.pid, directory)  # type: ignore[no-untyped-call]


def run_worker(config: ServiceConfig, lifeline: Connection, index: int) -> None:
    """A worker process: one service instance on its own socket until told to stop."""
    from rendezvous.server import run_service

    # The supervisor decides when to stop (see the module docstring); its pipe says so.
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    # Until the instance listens for it (to reload TLS), a SIGHUP must not end the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(name)s worker-{index} %(message)s"
    )
    listening_socket = reuse_port_socket(config.listen_host, config.listen_port)
    listening_socket.listen(LISTEN_BACKLOG)
    metrics_socket = None
    if config.metrics_listen is not None:
        # Any worker may answer: the metrics are summed over all of them.
        metrics_socket = reuse_port_socket(*split_listen(config.metrics_listen))
        metrics_socket.listen(LISTEN_BACKLOG)
    # Hypercorn takes the socket over (by its descriptor) and closes it when it stops.
    trio.run(
        partial(
            run_service,
            config,
            shutdown_trigger=partial(_until_stopped, lifeline),
            listening_socket=listening_socket,
            metrics_socket=metrics_socket,
            reload_on_hangup=True,
        )
    )


async def _until_stopped(lifeline: Connection) -> None:
    """Return when the supervisor closes this worker's pipe (to stop it, or by exiting)."""
    await trio.lowlevel.wait_readable(lifeline.fileno())
    logger.info("the supervisor closed this worker's pipe; shutting down")

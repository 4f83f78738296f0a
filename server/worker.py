"""One inference thread that owns the model and runs every job, fed by a bounded FIFO queue.

MLX streams are thread-local, so the model is loaded, and every generation runs, on this one thread.
Async servers talk to it through :class:`AsyncJob`, which never iterates a generator across threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Emit = Callable[[Any], None]
Work = Callable[[Any, Emit], Any]  # (model, emit) -> result, run on the worker thread


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the memory freed by a job (decoded pages, activations) back to the system: glibc keeps it
    in its arenas otherwise, and a server's resident size stays at its peak while idle."""
    if _TRIM is not None:
        _TRIM(0)


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` waiting jobs; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: the queue is full; retry after {retry_after}s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The job's client went away."""


class JobTimeout(Exception):
    """The job ran past its deadline."""


class ModelLoadError(RuntimeError):
    """The model a job names could not be loaded."""


@dataclass
class Job:
    """A unit of work for the worker; ``sink`` receives its events from the worker thread.

    ``keep_alive`` (seconds; None: the worker's) is how long the model stays loaded once the job is
    done; a job with ``needs_model`` False runs without loading it (e.g. an unload request).
    """

    model: str
    work: Work
    sink: Callable[[tuple[str, Any]], None]
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    keep_alive: float | None = None
    needs_model: bool = True

    def emit(self, event: Any) -> None:
        """Pass an event to the client; the check here is what cancels a job at its next token."""
        if self.cancelled.is_set():
            raise JobCancelled()
        if time.monotonic() > self.deadline:
            raise JobTimeout()
        self.sink(("event", event))


class InferenceWorker:
    """The thread that loads models and runs jobs one at a time, first in, first out.

    Args:
        models: model name -> path or repo id.
        default: the name loaded at start.
        loader: ``path -> model``, called on the worker thread.
        max_queue: the most jobs waiting behind the running one.
    """

    def __init__(
        self,
        models: dict[str, str],
        default: str,
        loader: Callable[[str], Any],
        max_queue: int = 16,
        keep_alive: float = math.inf,
    ):
        if default not in models:
            raise ValueError(f"the default model {default!r} is not among {sorted(models)}")
        self.models, self.default, self.loader = dict(models), default, loader
        self.keep_alive = keep_alive
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, max_queue))
        self.resident: str | None = None
        self.expires: float | None = None  # time.time() at which the idle resident model is unloaded
        self.state = "starting"  # starting, loading, ready, idle (unloaded after keep_alive), error
        self.error: str | None = None
        self.busy = False
        self._model: Any = None
        self._mean_seconds = 5.0
        self._job: Job | None = None
        self._thread = threading.Thread(target=self._run, name="dsocr-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def loaded_model(self) -> Any:
        """The model in memory, or None (read it for its description only: it runs on the worker thread)."""
        return self._model

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running job's current token, drop the waiting jobs and end the thread."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
        self._current_cancel()
        with contextlib.suppress(queue.Full):  # a job submitted meanwhile fills the queue: the thread is a daemon
            self.queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    def submit(
        self,
        model: str,
        work: Work,
        sink: Callable[[tuple[str, Any]], None],
        timeout: float,
        keep_alive: float | None = None,
        needs_model: bool = True,
    ) -> Job:
        """Queue ``work`` for ``model``; events reach ``sink`` as ``("event", x)``, then ``("done", result)``
        or ``("error", exception)``.

        Raises:
            KeyError: ``model`` is not configured.
            QueueFull: ``max_queue`` jobs are already waiting.
        """
        if model not in self.models:
            raise KeyError(model)
        job = Job(model, work, sink, time.monotonic() + timeout, keep_alive=keep_alive, needs_model=needs_model)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self._retry_after()) from None
        return job

    def check_room(self) -> None:
        """Raise :class:`QueueFull` now if a job submitted now would be refused (before any costly work)."""
        if self.queue.full():
            raise QueueFull(self._retry_after())

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds * (self.queue.qsize() + 1)))

    def _current_cancel(self) -> None:
        job = self._job
        if job is not None:
            job.cancelled.set()

    def _unload(self) -> None:
        """Drop the resident model and give its memory back (keep_alive ran out, or another model is next)."""
        if self.resident is not None:
            logger.info("unloading model %s", self.resident)
        self._model, self.resident, self.expires = None, None, None
        gc.collect()
        release_freed_memory()
        if self.state == "ready":
            self.state = "idle"

    def _load(self, name: str) -> None:
        if self.resident == name:
            return
        # One model in memory: drop the resident one before loading the next.
        self._unload()
        self.state = "loading"
        try:
            self._model = self.loader(self.models[name])
        except Exception as e:  # noqa: BLE001 - any loader failure is reported to the job and in health
            self.state, self.error = "error", f"{type(e).__name__}: {e}"
            logger.exception("cannot load model %s", name)
            raise ModelLoadError(f"the model {name!r} could not be loaded") from None
        self.resident, self.state, self.error = name, "ready", None

    def _next(self) -> Job | None:
        """The next job; while none comes, the memory its predecessor's requests freed goes back to the
        system (the last references to a request's pages drop after its job, on other threads), and the
        model is unloaded when its keep_alive runs out."""
        try:
            return self.queue.get(timeout=1.0)
        except queue.Empty:
            release_freed_memory()
        while True:
            wait = None if self.expires is None else max(0.0, self.expires - time.time())
            try:
                return self.queue.get(timeout=wait)
            except queue.Empty:
                self._unload()

    def _keep(self, seconds: float | None) -> None:
        """Keep the resident model for ``seconds`` from now (None: the configured keep_alive; 0: unload)."""
        seconds = self.keep_alive if seconds is None else seconds
        if self.resident is None or math.isinf(seconds):
            self.expires = None
        elif seconds <= 0:
            self._unload()
        else:
            self.expires = time.time() + seconds

    def _run(self) -> None:
        try:
            self._load(self.default)
            self._keep(None)
        except ModelLoadError:
            pass
        while (job := self._next()) is not None:
            if job.cancelled.is_set():  # its client left while it waited
                continue
            start = time.monotonic()
            self.busy, self._job = True, job
            try:
                if start > job.deadline:
                    raise JobTimeout()
                if job.needs_model:
                    self._load(job.model)
                job.sink(("done", job.work(self._model, job.emit)))
            except JobCancelled:
                logger.info("job cancelled: its client went away")
            except Exception as e:  # noqa: BLE001 - the job's owner maps the error; the worker keeps serving
                if not isinstance(e, (JobTimeout, ModelLoadError, ValueError)):
                    logger.exception("inference job failed")
                with contextlib.suppress(JobCancelled):  # nobody is listening any more
                    job.sink(("error", e))
            finally:
                self.busy, self._job = False, None
                self._keep(job.keep_alive)
                release_freed_memory()
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - start)


class AsyncJob:
    """A job seen from an asyncio event loop: events arrive on an ``asyncio.Queue`` through
    ``loop.call_soon_threadsafe``."""

    def __init__(
        self,
        worker: InferenceWorker,
        model: str,
        work: Work,
        timeout: float,
        keep_alive: float | None = None,
        needs_model: bool = True,
    ):
        loop = asyncio.get_running_loop()
        self.events_queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def sink(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(self.events_queue.put_nowait, item)
            except RuntimeError:  # the loop closed: nobody is listening any more
                raise JobCancelled() from None

        self.job = worker.submit(model, work, sink, timeout, keep_alive, needs_model)
        self.result: Any = None
        self.done = False

    def cancel(self) -> None:
        self.job.cancelled.set()

    async def events(
        self, is_disconnected: Callable[[], Awaitable[bool]] | None = None, poll: float = 0.25
    ) -> AsyncIterator[Any]:
        """Yield the job's events; afterwards ``self.result`` holds what the work returned.

        ``is_disconnected`` is asked every ``poll`` seconds, whether events are flowing or not, so a
        client that leaves frees the worker within a token or two of that.

        Raises:
            The job's exception, :class:`JobTimeout` past the deadline, or :class:`JobCancelled`
            when ``is_disconnected`` reports the client gone (the job is then cancelled).
        """
        getter: asyncio.Future | None = None
        asked = time.monotonic()
        try:
            while True:
                # asyncio.wait leaves the getter running on timeout (wait_for would cancel it and could drop an item).
                getter = getter or asyncio.ensure_future(self.events_queue.get())
                ready = (await asyncio.wait({getter}, timeout=poll))[0]
                if is_disconnected is not None and time.monotonic() - asked >= poll:
                    asked = time.monotonic()
                    if await is_disconnected():
                        raise JobCancelled()
                if not ready:
                    # The worker enforces the deadline at each token; this covers a job stuck between tokens.
                    if time.monotonic() > self.job.deadline + 5.0:
                        raise JobTimeout()
                    continue
                (kind, payload), getter = getter.result(), None
                if kind == "event":
                    yield payload
                elif kind == "done":
                    self.result, self.done = payload, True
                    return
                else:
                    raise payload
        finally:
            if getter is not None:
                getter.cancel()
            if not self.done:
                self.cancel()

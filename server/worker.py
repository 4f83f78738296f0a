"""The inference thread: it owns the model, runs jobs first in, first out, and steps the batch they share.

MLX streams are thread-local, so the model is loaded, and every generation runs, on this one thread;
a job's own code (preparing its pages, collecting its text) runs on a job thread. Async servers talk
to it through :class:`AsyncJob`, which never iterates a generator across threads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import gc
import logging
import math
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dsocr_mlx.engine import BatchEngine, BatchRunner

logger = logging.getLogger(__name__)

Emit = Callable[[Any], None]
Work = Callable[[Any, Emit], Any]  # (model, emit) -> result, run on a job thread (see InferenceWorker)


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the memory freed by a job (decoded pages, activations) or an unloaded model back to the system:
    glibc keeps it in its arenas otherwise, MLX and PyTorch's CUDA allocator in their buffer caches (MLX's on
    Apple's GPU up to the memory limit), and a server's resident size stays at its peak while idle."""
    if _TRIM is not None:
        _TRIM(0)
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_cache()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` waiting jobs; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: the queue is full; retry after {retry_after}s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The job's client went away."""


class JobTimeout(Exception):
    """The job ran past its deadline."""


class ServerStopping(RuntimeError):
    """The server is shutting down: a waiting job will not run, a running one was stopped."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down; send the request again once it is back")


class ModelLoadError(RuntimeError):
    """The model a job names could not be loaded."""


@dataclass(eq=False)  # a job is itself, whatever its fields: the worker keeps its running jobs in a set
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

    def check(self) -> None:
        """Raise if the job is to stop: its client left, or it ran past its deadline (called at every token)."""
        if self.cancelled.is_set():
            raise JobCancelled()
        if time.monotonic() > self.deadline:
            raise JobTimeout()

    def emit(self, event: Any) -> None:
        """Pass an event to the client (after :meth:`check`)."""
        self.check()
        self.sink(("event", event))


class InferenceWorker:
    """The thread that loads models and runs jobs, first in, first out, up to ``max_batch`` at a time.

    Each running job runs its work on a thread of its own, bound to the one batch this thread steps
    (:class:`~dsocr_mlx.engine.BatchRunner.bound`, so ``OCRModel.stream_ocr`` there hands its pages to
    it): the running jobs' pages share each decode step, a new job's prefill joins between steps, and a cancelled
    one leaves at once. With ``max_batch`` 1 jobs run one after another, as a single sequence each. All
    running jobs use one model: a job that names another waits until they are done (then the model is
    switched), and the jobs behind it wait too (first in, first out).

    Args:
        models: model name -> path or repo id.
        default: the name loaded at start.
        loader: ``path -> model``, called on the worker thread.
        max_queue: the most jobs waiting behind the running ones.
        keep_alive: seconds an idle model stays loaded (``inf``: always).
        max_batch: the most jobs running (and pages decoding) together.
    """

    def __init__(
        self,
        models: dict[str, str],
        default: str,
        loader: Callable[[str], Any],
        max_queue: int = 16,
        keep_alive: float = math.inf,
        max_batch: int = 1,
    ):
        if default not in models:
            raise ValueError(f"the default model {default!r} is not among {sorted(models)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.models, self.default, self.loader = dict(models), default, loader
        self.keep_alive, self.max_batch, self.max_queue = keep_alive, max_batch, max(1, max_queue)
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: set[Job] = set()
        self.resident: str | None = None
        self.expires: float | None = None  # time.time() at which the idle resident model is unloaded
        self.state = "starting"  # starting, loading, ready, idle (unloaded after keep_alive), error
        self.error: str | None = None
        self.runner: BatchRunner | None = None
        self._model: Any = None
        self._mean_seconds = 5.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._next_keep: float | None = None  # the keep_alive of the job that ended last
        self._ended = False
        self._pool = ThreadPoolExecutor(max_batch, thread_name_prefix="dsocr-job")
        self._thread = threading.Thread(target=self._run, name="dsocr-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def loaded_model(self) -> Any:
        """The model in memory, or None (read it for its description only: it runs on the worker thread)."""
        return self._model

    @property
    def busy(self) -> bool:
        return bool(self.running)

    @property
    def queued(self) -> int:
        return sum(not job.cancelled.is_set() for job in list(self.waiting))

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the waiting and running jobs (each stops at its next token) and end the thread."""
        with self._lock:
            self._stopping = True
            waiting, self.waiting = list(self.waiting), collections.deque()
            for job in [*waiting, *self.running]:
                job.cancelled.set()
        for job in waiting:  # their clients are still waiting for an answer: say why none comes
            with contextlib.suppress(Exception):
                job.sink(("error", ServerStopping()))
        self._wake.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

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
        with self._lock:
            if self._waiting_count() >= self.max_queue:
                raise QueueFull(self._retry_after())
            self.waiting.append(job)
        self._wake.set()
        return job

    def check_room(self) -> None:
        """Raise :class:`QueueFull` now if a job submitted now would be refused (before any costly work)."""
        with self._lock:
            if self._waiting_count() >= self.max_queue:
                raise QueueFull(self._retry_after())

    def _waiting_count(self) -> int:
        """The waiting jobs, after dropping those whose clients left (they no longer hold a place); under the lock."""
        if any(job.cancelled.is_set() for job in self.waiting):
            self.waiting = collections.deque(job for job in self.waiting if not job.cancelled.is_set())
        return len(self.waiting)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds * (len(self.waiting) + 1) / self.max_batch))

    def _unload(self) -> None:
        """Drop the resident model and give its memory back (keep_alive ran out, or another model is next)."""
        if self.resident is not None:
            logger.info("unloading model %s", self.resident)
        self._model, self.resident, self.expires, self.runner = None, None, None, None
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
            model = self.loader(self.models[name])
        except Exception as e:  # noqa: BLE001 - any loader failure is reported to the job and in health
            self.state, self.error = "error", f"{type(e).__name__}: {e}"
            logger.exception("cannot load model %s", name)
            raise ModelLoadError(f"the model {name!r} could not be loaded") from None
        self.runner = BatchRunner(BatchEngine(model, self.max_batch), wake=self._wake.set)
        self._model, self.resident, self.state, self.error = model, name, "ready", None

    def _keep(self, seconds: float | None) -> None:
        """Keep the resident model for ``seconds`` from now (None: the configured keep_alive; 0: unload)."""
        seconds = self.keep_alive if seconds is None else seconds
        if self.resident is None or math.isinf(seconds):
            self.expires = None
        elif seconds <= 0:
            self._unload()
        else:
            self.expires = time.time() + seconds

    def _start_jobs(self) -> None:
        """Start waiting jobs while there is room and they use the resident model (first in, first out)."""
        while True:
            with self._lock:
                if not self.waiting or len(self.running) >= self.max_batch:
                    return
                job = self.waiting[0]
                if job.cancelled.is_set():  # its client left while it waited
                    self.waiting.popleft()
                    continue
                other_model = job.needs_model and job.model != self.resident
                if (other_model or not job.needs_model) and self.running:
                    return  # switching models (or unloading) waits for the running jobs
                self.waiting.popleft()
                self.running.add(job)
            try:
                if time.monotonic() > job.deadline:
                    raise JobTimeout()
                if job.needs_model:
                    self._load(job.model)
                    self.expires = None
            except Exception as e:  # noqa: BLE001 - reported to the job; the worker keeps serving
                self._finished(job, error=e)
                continue
            if job.needs_model:
                self._pool.submit(self._run_job, job, self._model, self.runner)
            else:  # a control job (an unload): runs here, without the model, when no job is running
                try:
                    result = job.work(None, job.emit)
                    if job.model == self.resident:  # unloading a model not in memory leaves the loaded one
                        self._keep(job.keep_alive)
                    job.sink(("done", result))
                except Exception as e:  # noqa: BLE001 - reported to the job
                    self._finished(job, error=e)
                    continue
                self._finished(job)

    def _run_job(self, job: Job, model: Any, runner: BatchRunner) -> None:
        """A job's work, on a job thread: its pages join the batch the worker thread steps."""
        start = time.monotonic()
        try:
            with runner.bound(job.check):
                result = job.work(model, job.emit)
            job.sink(("done", result))
        except JobCancelled:
            if self._stopping:  # stopped by the shutdown, not by its client: tell the client
                self._finished(job, error=ServerStopping())
            else:
                logger.info("job cancelled: its client went away")
                self._finished(job)
        except Exception as e:  # noqa: BLE001 - the job's owner maps the error; the worker keeps serving
            if not isinstance(e, (JobTimeout, ModelLoadError, ValueError)):
                logger.exception("inference job failed")
            self._finished(job, error=e)
        else:
            self._finished(job)
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - start)

    def _finished(self, job: Job, error: Exception | None = None) -> None:
        if error is not None:
            with contextlib.suppress(JobCancelled):  # nobody is listening any more
                job.sink(("error", error))
        with self._lock:
            self.running.discard(job)
            if job.needs_model:  # a control job has applied its keep_alive (see _start_jobs)
                self._next_keep, self._ended = job.keep_alive, True
        self._wake.set()

    def _run(self) -> None:
        try:
            self._load(self.default)
            self._keep(None)
        except ModelLoadError:
            pass
        while not self._stopping:
            self._wake.clear()
            self._start_jobs()
            runner = self.runner
            try:
                if runner is not None and runner.pump():
                    continue
            except Exception as e:  # noqa: BLE001 - a failed step fails its pages; the worker keeps serving
                logger.exception("a decode step failed")
                runner.fail_all(e)
            with self._lock:
                busy = bool(self.running or self.waiting)
            if busy:  # jobs are between pages (preparing the next one) or waiting for a model switch
                self._wake.wait(1.0)
                continue
            if self._ended:  # the last job just ended: its keep_alive starts now
                self._ended = False
                self._keep(self._next_keep)
            wait = 1.0 if self.expires is None else max(0.0, min(1.0, self.expires - time.time()))
            if not self._wake.wait(wait):
                release_freed_memory()
                if self.expires is not None and time.time() >= self.expires:
                    self._unload()
        if self.runner is not None:  # job threads waiting for their pages' tokens stop now
            self.runner.close(JobCancelled())


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

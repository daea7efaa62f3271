"""Pulls inside the daemon: one job per model (a second request joins it), at most MAX_PULLS
running at once on daemon threads of their own, independent of any client: a client that leaves
(the tray closing) does not stop its pull. Progress is kept per job so a joiner sees it too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from appliance.errors import ServiceUnavailable
from appliance.library.download import Cancel
from appliance.library.durability import settle
from appliance.library.errors import LibraryError
from appliance.library.progress import Progress, Throttle
from appliance.library.pull import Library, PullPlan

log = logging.getLogger(__name__)

MAX_PULLS = 2  # downloads share one network link; more at once only slows each
MAX_WAITING = 8  # pulls queued beyond the running ones; then 503
KEEP_FINISHED_S = 60.0  # a finished job's outcome stays visible (a late joiner, the tray)
STOP_WAIT_S = 10.0  # a stopping daemon waits this long for its pulls to put their files down


class PullJob:
    """One model's pull: its progress lines, its outcome, the clients following it."""

    def __init__(self, plan: PullPlan, loop: asyncio.AbstractEventLoop) -> None:
        self.plan = plan
        self.model_id = plan.model_id
        self.loop = loop
        self.lines: list[tuple[int, dict[str, Any]]] = []  # (sequence, line)
        self.seq = 0
        self.finished = False
        self.finished_at: float | None = None
        self.error: LibraryError | None = None
        self.cancel = Cancel()
        self.thread: threading.Thread | None = None
        self._changed = asyncio.Event()  # set and replaced on each change

    # -- the worker thread's side ----------------------------------------------------------

    def publish(self, event: Progress) -> None:
        self.loop.call_soon_threadsafe(self._add, event.line())

    def finish(self, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, LibraryError):
            log.exception("pull of %s failed", self.model_id, exc_info=error)
            error = LibraryError(f"the pull of {self.model_id} failed: {error}")
        self.loop.call_soon_threadsafe(self._finish, error)

    # -- the event loop's side -------------------------------------------------------------

    def _add(self, line: dict[str, Any]) -> None:
        self.seq += 1
        last = self.lines[-1][1] if self.lines else None
        # Byte counts of the same stage and file replace each other: a joiner gets the latest.
        if last is not None and "completed" in line and last.get("status") == line["status"] \
                and last.get("stage") == line["stage"]:
            self.lines[-1] = (self.seq, line)
        else:
            self.lines.append((self.seq, line))
        self._notify()

    def _finish(self, error: LibraryError | None) -> None:
        self.error = error
        if error is not None:
            self.seq += 1
            self.lines.append((self.seq, {"status": "error", "stage": "error",
                                          "error": error.message, "model": self.model_id}))
        self.finished, self.finished_at = True, time.monotonic()
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        """Every line so far, then each new one, until the job ends."""
        sent = 0
        while True:
            changed = self._changed  # taken first: a change while we yield wakes the wait
            fresh = [line for seq, line in self.lines if seq > sent]
            sent = self.seq
            finished = self.finished
            for line in fresh:
                yield line
            if finished:
                return
            await changed.wait()

    def describe(self) -> dict[str, Any]:
        last = self.lines[-1][1] if self.lines else {"status": "waiting", "stage": "resolve"}
        return {"model": self.model_id, "source": str(self.plan.ref), "finished": self.finished,
                "error": self.error.message if self.error else None, **last}


class PullJobs:
    """The daemon's pulls, keyed by model id."""

    def __init__(self, library: Library, max_running: int = MAX_PULLS,
                 max_waiting: int = MAX_WAITING) -> None:
        self.library = library
        self.jobs: dict[str, PullJob] = {}
        self._slots = threading.BoundedSemaphore(max_running)
        self._limit = max_running + max_waiting
        self.on_installed: Callable[[str], None] = lambda _: None

    def active(self, model_id: str) -> PullJob | None:
        job = self.jobs.get(model_id)
        return job if job is not None and not job.finished else None

    def start_or_join(self, plan: PullPlan, force: bool = False) -> PullJob:
        self._forget_old()
        job = self.active(plan.model_id)
        if job is not None:
            return job
        if sum(not j.finished for j in self.jobs.values()) >= self._limit:
            raise ServiceUnavailable("too many pulls are running or waiting; try again later",
                                     retry_after=30)
        job = PullJob(plan, asyncio.get_running_loop())
        self.jobs[plan.model_id] = job
        # A daemon thread: a stop cancels it and waits a bounded time (stop()), never more.
        job.thread = threading.Thread(target=self._run, args=(job, force),
                                      name=f"pull-{plan.model_id}", daemon=True)
        job.thread.start()
        return job

    def _run(self, job: PullJob, force: bool) -> None:
        throttle = Throttle(job.publish, interval=0.5)
        if not self._slots.acquire(blocking=False):
            job.publish(Progress("resolve", "waiting for another pull to finish",
                                 model=job.model_id))
            self._slots.acquire()
        error: BaseException | None = None
        try:
            self.library.pull(job.plan, lambda e: throttle(e, force=e.completed is None),
                              job.cancel, force=force)
            self.on_installed(job.model_id)
        except BaseException as e:  # reported to every follower, never raised on a thread
            error = e
        finally:
            self._slots.release()
            job.finish(error)
        if error is None:  # the followers have their answer; the disk catches up here
            try:
                settle(self.library.models_dir, job.model_id, drop_pages=True)
            except Exception:  # the model's first load settles it, or says why it cannot
                log.exception("settling %s failed", job.model_id)

    def _forget_old(self) -> None:
        now = time.monotonic()
        for mid, job in list(self.jobs.items()):
            if job.finished and job.finished_at is not None and \
                    now - job.finished_at > KEEP_FINISHED_S:
                del self.jobs[mid]

    def cancel_all(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()

    def stop(self, wait_s: float = STOP_WAIT_S) -> list[str]:
        """Blocking (call it off the event loop): cancel every pull and wait, up to `wait_s`,
        for each to reach a clean point: its partial file written and closed (a later pull
        resumes it), never a model half renamed into the folder. Returns the ids still
        running after the wait (a conversion inside llama.cpp cannot be interrupted)."""
        self.cancel_all()
        deadline = time.monotonic() + wait_s
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))
        return [j.model_id for j in self.jobs.values()
                if j.thread is not None and j.thread.is_alive()]

    def describe(self) -> list[dict[str, Any]]:
        self._forget_old()
        return [job.describe() for job in self.jobs.values()]

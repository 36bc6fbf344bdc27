"""A fixed pool of worker threads running tasks in submission order, each task's result
(or exception) waited for by the caller: what pack's chunk pipeline needs of
concurrent.futures.ThreadPoolExecutor, without it (concurrent.futures imports logging:
~1.2 MiB of pack's RSS, against mkfs.erofs's ~45 MiB for the same tree). And one call
on a thread of its own (`started`): pack's tail, where the blob's finish and the chunk
info table's sort run beside the bootstrap's work."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class TaskCancelled(Exception):
    """result() of a task cancelled before it started."""


class Task(Generic[T]):
    """One submitted call: result() waits for it and returns its value or raises what it
    raised; cancel() keeps it from starting (a running task runs to its end)."""
    __slots__ = ("_fn", "_args", "_done", "_value", "_error", "_cancelled")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self._fn: Callable[..., T] | None = fn
        self._args: tuple[Any, ...] | None = args
        # held until the task ends: result() waits by taking it (and gives it back at
        # once, for any later caller). A threading.Event was a Condition and its lock
        # made in Python per task, and its wait a Python-level waiter list: made, set
        # and waited for ~3.2 us against ~0.3 us (more when the wait blocks), GIL held
        self._done = threading.Lock()
        self._done.acquire()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._cancelled = False

    def _run(self) -> None:
        fn, args = self._fn, self._args
        self._fn = self._args = None        # the batch is not kept past its run
        try:
            if self._cancelled or fn is None or args is None:
                self._error = TaskCancelled()
            else:
                self._value = fn(*args)
        except BaseException as e:          # handed to whoever waits for the result
            self._error = e
        finally:
            self._done.release()

    def cancel(self) -> bool:
        """-> False if it is too late: the call had started (and runs to its end)."""
        self._cancelled = True
        # _run takes the call (clears _fn) before it looks at _cancelled: either it
        # sees the flag or the call is gone from here (the GIL orders the two)
        return self._fn is not None

    def result(self) -> T:
        with self._done:
            pass
        if self._error is not None:
            raise self._error
        return self._value          # type: ignore[return-value]


class WorkPool:
    """`workers` threads named `name`-N taking tasks from one queue; a context manager
    whose exit (or close()) lets the queued tasks run (or be skipped, if cancelled) and
    joins the threads."""

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError("a work pool needs at least one worker")
        self._q: queue.SimpleQueue[Task[Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        try:
            for i in range(workers):
                t = threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            self.close()
            raise

    def _work(self) -> None:
        while True:
            task = self._q.get()
            if task is None:
                return
            task._run()
            del task

    def submit(self, fn: Callable[..., T], *args: Any) -> Task[T]:
        task: Task[T] = Task(fn, args)
        self._q.put(task)
        return task

    def close(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def __enter__(self) -> WorkPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Started(Generic[T]):
    """One call running on a thread of its own (`started`): result() waits for it and
    returns its value or raises what it raised; join() only waits. Either returns once
    the thread has ended, not only the call: no thread outlives its wait (a live
    non-daemon one would also cost the program its fast exit, errors.exit_now)."""
    __slots__ = ("_task", "_thread")

    def __init__(self, task: Task[T], thread: threading.Thread) -> None:
        self._task = task
        self._thread = thread

    def running_here(self) -> bool:
        """The caller is the call's own thread (the call itself, or what it calls)."""
        return self._thread is threading.current_thread()

    def join(self) -> None:
        """Wait for the call to end (its outcome left to result()); at once on the
        call's own thread, which cannot wait for itself: a cleanup that the call may run
        itself on failure (BlobWriter.abort from its finish) still waits for it from
        every other thread."""
        if not self.running_here():
            self._thread.join()

    def result(self) -> T:
        """The call's value, or its exception raised here; any number of times, from
        any thread but its own (RuntimeError there: it would wait for itself)."""
        self._thread.join()
        return self._task.result()


def started(fn: Callable[..., T], *args: Any, name: str) -> Started[T]:
    """fn(*args) started on a new thread named `name`. Not a daemon thread: its owner
    waits for it on every path (result() or join()), and should that wait be cut short
    (a second Ctrl-C), the interpreter's exit lets the call end rather than freeze it
    wherever it is (a blob's finish in the middle of its writes, its temporary file
    left half-written) or, through errors.exit_now, kill it."""
    task: Task[T] = Task(fn, args)
    t = threading.Thread(target=task._run, name=name, daemon=False)
    try:
        t.start()
    except BaseException:
        # an interrupt inside start() may come after the thread began: then the call
        # either never runs, or it had begun and is waited for here (the caller has no
        # handle to wait with: a blob's abort would write beside its finish)
        if not task.cancel():
            t.join()        # it began, so the thread had started
        raise
    return Started(task, t)

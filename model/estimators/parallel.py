"""The per-pair work of the estimators (a classical method, a refinement, the correlations a best-of chain
compares), run in this process or over a pool of worker processes, with the same results in the same order.

Every job goes through pair_job, here or in a worker, with OpenCV on one thread (a pool of N workers uses N
cores; the results do not depend on OpenCV's threading either way). Workers are started with 'spawn': the
main process may hold TensorFlow's threads, which a fork would copy in an unknown state. An exception inside
a job, or a worker that dies, becomes one WorkerError naming the pair and the cause.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool

import cv2

from model.estimators import classical, refine
from model.estimators.estimate import Frame, to_gray


class WorkerError(RuntimeError):
    """A job that raised, here or in a worker process; the message is one line."""


def pair_job(job: tuple):
    """('classical', name, a, b, whole) -> Estimate; ('refine', a, b, start, whole) -> Estimate;
    ('correlations', a, b, homographies) -> [float]."""
    op = job[0]
    if op == "classical":
        _, name, a, b, whole = job
        return classical.estimate(name, a, b, whole)
    if op == "refine":
        _, a, b, start, whole = job
        return refine.refine(a, b, start, Frame.of(b, whole))
    if op == "correlations":
        _, a, b, homographies = job
        return refine.correlations(to_gray(a), to_gray(b), homographies)
    raise ValueError(f"unknown job '{op}'")


def _guarded(job: tuple) -> tuple:
    try:
        return True, pair_job(job)
    except Exception as e:  # noqa: BLE001 - reported to the caller as one line, whatever it was
        text = str(e).strip().splitlines()
        return False, f"{type(e).__name__}: {text[-1] if text else ''}"


def _one_thread(driver_pid: int) -> None:
    from pipeline.runtime.sdk_worker import exit_without_driver

    cv2.setNumThreads(1)
    exit_without_driver(driver_pid)  # a SIGKILLed model.evaluate must not leave its workers running


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Pool:
    """A pool of `workers` processes (started on first use, closed by close() or the with block)."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._executor = None

    def map(self, jobs: list) -> list:
        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread,
                initargs=(os.getpid(),))
        chunk = max(1, len(jobs) // (4 * self.workers))
        try:
            return list(self._executor.map(_guarded, jobs, chunksize=chunk))
        except BrokenProcessPool as e:
            self.close()
            raise WorkerError(f"a worker process died ({e})") from None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_jobs(jobs: list, pool: Pool | None = None) -> list:
    """The results of pair_job on every job, in order: over the pool when there is one with more than one
    worker, else here (OpenCV on one thread meanwhile). Raises WorkerError for the first job that failed."""
    if pool is not None and pool.workers > 1 and len(jobs) > 1:
        results = pool.map(jobs)
    else:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            results = [_guarded(job) for job in jobs]
        finally:
            cv2.setNumThreads(threads)
    for i, (ok, value) in enumerate(results):
        if not ok:
            raise WorkerError(f"{jobs[i][0]} on pair {i} of the batch failed: {value}")
    return [value for _, value in results]

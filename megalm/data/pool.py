"""``pool.imap`` with a bounded read-ahead: the one owner of that rule (torch-free).

``multiprocessing.Pool.imap`` lets its task thread pull the input iterator as fast as it
can, so a slow consumer ends up with the whole input in the task queue (a corpus in
preprocessing, an epoch of micro-batches in the loader). :func:`bounded_imap` hands the
pool an item only when a slot is free and frees the slot when the caller takes the
result, so at most ``ahead`` items are in flight.

Used by ``data_tools.preprocess`` (record batches -> tokenizer workers) and
``megalm.data.loader`` (micro-batches -> builder workers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import Pool
from typing import Any


def _acquire(items: Iterable, slots: threading.BoundedSemaphore, stop: threading.Event) -> Iterator:
    """Runs in the pool's task thread: hand out an item when a slot frees up, until ``stop``."""
    for item in items:
        while not slots.acquire(timeout=0.05):
            if stop.is_set() or not threading.main_thread().is_alive():  # closed, or interpreter exit
                return
        yield item


def _release(results: Iterable, slots: threading.BoundedSemaphore) -> Iterator:
    for result in results:
        slots.release()
        yield result


def bounded_imap(
    pool: Pool, fn: Callable[[Any], Any], items: Iterable, ahead: int, stop: threading.Event
) -> Iterator:
    """``pool.imap(fn, items)`` with at most ``ahead`` items taken from ``items`` and not yet consumed.

    The pool starts working at once (``imap`` is called here, not on the first ``next``).
    Set ``stop`` before ``pool.terminate()`` (also the exit of ``with pool``): terminate
    joins the task thread, which may be waiting for a slot the caller will never free.

    Args:
        pool: a started ``multiprocessing`` pool.
        fn: what each worker runs on one item (picklable).
        items: the inputs, read lazily by the pool's task thread.
        ahead: items in flight at most (>= 1).
        stop: set it to make the task thread stop taking items.

    Returns:
        ``fn(item)`` for each item, in order.
    """
    slots = threading.BoundedSemaphore(ahead)
    return _release(pool.imap(fn, _acquire(items, slots, stop)), slots)

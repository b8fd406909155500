"""Dynamic batching: requests that arrive together are classified as one batch (up to a size or a
wait), on a worker thread, so a busy service spends its CPU on the network, not on per-call overhead."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from signscale.serving.http_errors import Overloaded
from signscale.serving.predict import Predictor


@dataclass
class _Item:
    arrays: list[np.ndarray]
    predictor: Predictor
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Groups images of concurrent requests into forward passes of up to ``max_batch`` images.

    Runs in the event loop; the forward pass runs on one dedicated thread (the network is the
    bottleneck, and two passes at once on a small CPU only contend for its cores).
    """

    def __init__(self, *, max_batch: int, max_wait_s: float, max_queue: int, retry_after_s: int,
                 observe: Callable[[int], None] | None = None) -> None:
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.retry_after_s = retry_after_s
        self._observe = observe or (lambda n: None)
        self._items: deque[_Item] = deque()
        self.queued = 0  # images waiting
        self.incoming = 0  # requests decoding, about to submit
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="signscale-runner")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    def enqueue(self, arrays: list[np.ndarray], predictor: Predictor) -> asyncio.Future:
        """Queue ``arrays`` (prepared by ``predictor``, and to be run by it); 503 when the queue is full."""
        if self.queued + len(arrays) > self.max_queue:
            raise Overloaded("queue_full", f"{self.queued} images are waiting for the model (limit "
                             f"{self.max_queue}); retry after {self.retry_after_s}s", self.retry_after_s)
        item = _Item(arrays, predictor, asyncio.get_running_loop().create_future())
        self._items.append(item)
        self.queued += len(arrays)
        self._wake.set()
        return item.future

    async def result(self, future: asyncio.Future, timeout_s: float, request_timeout_s: float | None = None) \
            -> np.ndarray:
        """The probabilities for a queued request; 503 when the model does not get to it in time.

        ``timeout_s`` is what is left of the request's time (``request_timeout_s``, said in the error).
        """
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise Overloaded("timeout", f"no answer within {request_timeout_s or timeout_s:g}s (the service is "
                             f"overloaded); retry after {self.retry_after_s}s", self.retry_after_s) from None

    async def submit(self, arrays: list[np.ndarray], predictor: Predictor, timeout_s: float) -> np.ndarray:
        return await self.result(self.enqueue(arrays, predictor), timeout_s)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                self._wake.clear()
                await self._wake.wait()
            batch = await self._collect(loop)
            if not batch:
                continue
            predictor = batch[0].predictor
            x = np.stack([a for it in batch for a in it.arrays])
            self._observe(len(x))
            try:
                probs = await loop.run_in_executor(self._pool, predictor.probabilities, x)
            except Exception as exc:  # noqa: BLE001 - delivered to each waiting request (a 500: a bug)
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            start = 0
            for it in batch:
                n = len(it.arrays)
                if not it.future.done():
                    it.future.set_result(probs[start:start + n])
                start += n

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Item]:
        """Up to ``max_batch`` images of one predictor.

        Waits at most ``max_wait_s`` for more, and only while some request is still decoding: with
        nobody on the way, waiting would only add latency (a lone client pays nothing for batching).
        """
        deadline = loop.time() + self.max_wait_s
        batch: list[_Item] = []
        n = 0
        while True:
            while self._items:
                head = self._items[0]
                if head.future.done():  # timed out: skip its work
                    self._items.popleft()
                    self.queued -= len(head.arrays)
                    continue
                if batch and (head.predictor is not batch[0].predictor or n + len(head.arrays) > self.max_batch):
                    return batch
                self._items.popleft()
                self.queued -= len(head.arrays)
                batch.append(head)
                n += len(head.arrays)
                if n >= self.max_batch:
                    return batch
            remaining = deadline - loop.time()
            if not batch or remaining <= 0 or self.incoming == 0:
                return batch
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return batch

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Marks a request as on its way (decoding), so a forming batch waits for it."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1
            self._wake.set()

"""Dynamic batching for the prediction service: requests that arrive together share one forward
pass.

A model's forward pass over N images costs much less than N passes over one (the weights are
read once, the kernels run on bigger tiles), so under concurrent load the service answers more
requests per second when it joins them. One consumer task runs the batches one after another:
it takes the first waiting image and whatever else arrived during the previous pass, up to
`max_batch`, then waits up to `max_wait` seconds for more (the service's default is 0: a lone
request is never held back, and under load the queue that builds up during one pass is the next
pass's batch). Measured on the CPU (BENCHMARKS.md): about 1.25x the requests a second on PyTorch
at 8-16 clients, but twice the latency of one request alone (two thread hops instead of one),
and slower on ONNX Runtime, whose separate passes already run in parallel; hence opt-in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Stats:
    """What /health reports: forward passes run and the images they held."""

    batches: int = 0
    images: int = 0
    largest: int = 0


@dataclass
class Batcher:
    """Joins images submitted from request handlers into batches for `run` (uint8 (N, C, S, S)
    -> (N, classes)), which is called in a worker thread, one batch at a time."""

    run: Callable[[Tensor], Tensor]
    max_batch: int
    max_wait: float  # seconds
    stats: Stats = field(default_factory=Stats)
    _queue: asyncio.Queue[tuple[Tensor, asyncio.Future[Tensor]]] | None = None
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {self.max_batch}")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must not be negative, not {self.max_wait}")

    async def submit(self, image: Tensor) -> Tensor:
        """One image (C, S, S) -> its row of `run`'s output."""
        if self._queue is None:  # made here: it belongs to the running event loop
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._consume())
        future: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _consume(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            live = [(image, f) for image, f in batch if not f.cancelled()]  # clients gone
            if not live:
                continue
            try:
                import torch

                out = await loop.run_in_executor(
                    None, self.run, torch.stack([image for image, _ in live]))
            except Exception as e:  # every request of the batch gets the error
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.images += len(live)
            self.stats.largest = max(self.stats.largest, len(live))
            for row, (_, f) in zip(out, live, strict=True):
                if not f.done():
                    f.set_result(row)

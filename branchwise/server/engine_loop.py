"""Runs the engine in its own thread so the event loop never waits on a forward pass."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator

from branchwise.engine.engine import LLMEngine
from branchwise.engine.sequence import SamplingParams, SeqUpdate

log = logging.getLogger(__name__)


class EngineLoop:
    """Steps the engine while it has work and routes each update to its request's asyncio queue."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="branchwise-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Sequences accepted but not running (the queue that --max-queue bounds)."""
        return self.engine.num_waiting_seqs

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                updates = self.engine.step()
            except Exception:  # an engine bug: end the requests in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                updates = self.engine.fail_all("engine step failed")
            if updates:
                self._loop.call_soon_threadsafe(self._dispatch, updates)

    def _dispatch(self, updates: list[SeqUpdate]) -> None:
        by_request: dict[str, list[SeqUpdate]] = defaultdict(list)
        for u in updates:
            by_request[u.request_id].append(u)
        for request_id, batch in by_request.items():
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(batch)

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        strategy: str | None = None,
        strategy_params: dict | None = None,
    ) -> None:
        """Queue a request with the engine; raises ValueError for a bad one (nothing is queued then)."""
        self._queues[request_id] = asyncio.Queue()
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, strategy, strategy_params)
        except Exception:
            self._queues.pop(request_id, None)
            raise
        self._wake.set()

    async def updates(
        self, request_id: str, n: int, timeout: float | None = None
    ) -> AsyncIterator[list[SeqUpdate]]:
        """Each step's updates of a submitted request until its n sequences finish.

        If the consumer stops early (client gone) the request is aborted and its blocks are freed at the
        engine's next step; past `timeout` seconds it is aborted and ends with finish_reason "abort".
        """
        queue = self._queues[request_id]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        finished = 0
        try:
            while finished < n:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    batch = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    self.abort(request_id)
                    deadline = None  # the abort's own updates end the request
                    continue
                finished += sum(1 for u in batch if u.finish_reason)
                yield batch
        finally:
            self._queues.pop(request_id, None)
            if finished < n:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Abort a submitted request nobody will read from."""
        self._queues.pop(request_id, None)
        self.abort(request_id)

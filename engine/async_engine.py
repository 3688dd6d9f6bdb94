"""The engine behind the server: a background thread steps LLMEngine; asyncio callers stream its outputs.

One thread owns the engine (model, cache, scheduler); callers talk to it through a command queue, so no
engine state is ever touched from two threads. Outputs travel back to each request's asyncio.Queue with
loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from .config import EngineConfig
from .errors import CapacityError, EngineError, StepError
from .llm_engine import EngineStats, LLMEngine
from .sampling_params import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger("longserve.engine")

# A failed step fails only its requests; this many failed steps in a row mean the engine itself is broken (a
# lost device, a kernel that always fails): the thread stops so that the server exits and is restarted.
MAX_FAILED_STEPS_IN_A_ROW = 3


class _Failed:
    """Marker put on a request's queue when the engine failed it."""

    def __init__(self, error: BaseException):
        self.error = error


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config)
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.model_config.vocab_size
        self.grammars = self.engine.grammars  # thread-safe: the server compiles grammars while validating
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.engine.stats()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.dead: BaseException | None = None  # set if the engine thread crashed
        self._death_callbacks: list[Callable[[], None]] = []
        self._death_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="longserve-engine", daemon=True)
        self._thread.start()

    # -- caller side (any thread / event loop) ---------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError now (before streaming starts) for a request that can never run."""
        self.engine.validate_request(prompt_token_ids, params)  # reads only immutable engine settings

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, validated: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutput snapshots (full text so far) until the request finishes.

        validated=True: the caller ran validate() on these arguments (the engine thread trusts this call's
        check either way). Cancelling the consumer (client disconnect) aborts the request and frees its blocks."""
        if self.dead is not None:
            raise EngineError(f"the engine has stopped: {self.dead}")
        if len(self._streams) >= self.config.max_waiting + self.config.max_num_seqs:
            raise CapacityError(f"the server is at capacity ({len(self._streams)} requests queued); retry later")
        if not validated:
            self.validate(prompt_token_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, q)
        self._commands.put(("add", request_id, prompt_token_ids, params))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, _Failed):
                    finished = True
                    raise item.error
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def on_death(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the engine thread has stopped on an error (the server exits non-zero then); at
        once if it already has. Runs on the engine thread."""
        with self._death_lock:
            if self.dead is None:
                self._death_callbacks.append(callback)
                return
        callback()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params = command
            if request_id not in self._streams:  # cancelled before the engine saw it
                return
            try:
                self.engine.add_request(prompt, params, request_id, validated=True)
            except Exception as e:
                self._deliver(request_id, _Failed(e))
        elif kind == "abort":
            self.engine.abort(command[1])

    def _loop(self) -> None:
        failed_steps = 0
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                try:
                    command = self._commands.get(block=block, timeout=0.5 if block else None)
                    self._handle(command)
                    while True:
                        self._handle(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    try:
                        outputs = self.engine.step()
                        failed_steps = 0
                    except StepError as e:  # its requests were aborted; the others go on
                        failed_steps += 1
                        log.error("engine step failed (%d in a row); its requests fail", failed_steps,
                                  exc_info=e.__cause__)
                        for request_id in e.request_ids:
                            self._deliver(request_id, _Failed(EngineError("internal engine error")))
                        if failed_steps >= MAX_FAILED_STEPS_IN_A_ROW:
                            raise
                        outputs = []
                    for out in outputs:
                        self._deliver(out.request_id, out)
                self._stats = self.engine.stats()
        except BaseException as e:  # a crash fails every request instead of hanging them
            log.exception("engine thread crashed")
            with self._death_lock:
                self.dead = e
                callbacks = list(self._death_callbacks)
            for request_id in list(self._streams):
                self._deliver(request_id, _Failed(EngineError("internal engine error")))
            for callback in callbacks:
                callback()
        finally:
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
            self._stats = self.engine.stats()
            for request_id in list(self._streams):
                self._deliver(request_id, _Failed(EngineError("the engine is shutting down")))

"""The model host: owns the engine for the life of the process, and counts the requests it holds.

The engine is built in a worker thread (loading weights and profiling take
seconds to minutes) so that the gRPC server keeps answering health checks,
NOT_SERVING, the whole time; it is warmed up before any request may run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator

from sluice_core.errors import Unavailable
from sluice_inference import tiny_model
from sluice_inference.engines import Engine, EngineOutput, engine_module
from sluice_inference.load import Admission, Load
from sluice_inference.requests import ValidRequest
from sluice_inference.settings import InferenceSettings

logger = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 0.5


class ModelHost:
    def __init__(self, settings: InferenceSettings) -> None:
        self._settings = settings
        self._building: asyncio.Future[Engine] | None = None  # the build, on a thread of its own
        self._built: Engine | None = None  # once built: it must be shut down
        self._engine: Engine | None = None  # once warm: requests may run
        self.load = Load()

    async def start(self) -> None:
        """Build the engine off the event loop, then warm it up."""
        module = await asyncio.to_thread(engine_module, self._settings)
        model_dir = await asyncio.to_thread(self._model_dir)
        logger.info("loading %s (%s engine)", model_dir, self._settings.engine)
        # Kept (and shielded): a stop while loading cannot stop the thread, and the
        # engine it builds must still be shut down (see close).
        self._building = asyncio.ensure_future(asyncio.to_thread(module.build, self._settings, model_dir, self.load))
        self._built = engine = await asyncio.shield(self._building)
        await engine.warm_up()
        self._engine = engine
        logger.info("serving %s", engine.spec)

    def _model_dir(self) -> str:
        if self._settings.model:
            return self._settings.model
        return str(tiny_model.ensure(self._settings.tiny_model_dir))

    def require_ready(self) -> Engine:
        """The engine, once warm; UNAVAILABLE while loading or once the engine died."""
        if self._engine is None:
            raise Unavailable("the model is still loading; retry shortly", retry_after_s=1.0)
        if self._engine.errored:
            raise Unavailable("the model engine has stopped; this replica is out of service")
        return self._engine

    def generate(self, request: ValidRequest) -> AsyncGenerator[EngineOutput]:
        """Stream the engine's outputs for a validated request."""
        return self.require_ready().generate(request)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[Admission]:
        """Count a request in ``load`` for the block: waiting until ``start()``, running until ``end()`` or the
        block's end."""
        admission = Admission(self.load)
        try:
            yield admission
        finally:
            admission.end()

    def unfinished_requests(self) -> int:
        """Requests the engine itself still holds (0 once aborted ones are freed)."""
        return self._engine.unfinished_requests() if self._engine is not None else 0

    async def watch(self, on_dead: Callable[[], Awaitable[None]]) -> None:
        """Call ``on_dead`` once if the engine dies (its process crashed or was killed)."""
        # vLLM offers no event for engine death, only the `errored` flag.
        while self._engine is not None and not self._engine.errored:  # noqa: ASYNC110
            await asyncio.sleep(_WATCH_INTERVAL_S)
        logger.error("the model engine died; reporting NOT_SERVING")
        await on_dead()

    async def close(self) -> None:
        self._engine = None
        if self._built is None and self._building is not None:
            # Stopped while loading: the process cannot exit before the build's thread
            # ends anyway, so wait for it and shut down what it built.
            with contextlib.suppress(Exception):
                self._built = await self._building
        if self._built is not None:
            engine, self._built = self._built, None
            await engine.shutdown()

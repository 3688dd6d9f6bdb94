"""Errors the engine raises on purpose. Each carries a one-line message meant for the user."""


class EngineError(Exception):
    """Base class: a clear, user-facing failure (the CLI prints it in one line and exits non-zero)."""


class ModelLoadError(EngineError):
    """The model path, its files or its architecture cannot be used."""


class RequestError(EngineError, ValueError):
    """A single request is invalid (too long, bad sampling parameters). Other requests are unaffected.

    param names the offending request field where there is one (mapped to OpenAI's error 'param')."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class CapacityError(EngineError):
    """The engine cannot take more work right now (waiting queue full)."""


class StepError(EngineError):
    """One engine step failed. The requests it ran (request_ids) have been aborted, their blocks returned; the
    engine itself goes on serving the others."""

    def __init__(self, message: str, request_ids: list[str]):
        super().__init__(message)
        self.request_ids = request_ids

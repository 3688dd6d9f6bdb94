"""The engine: requests, scheduler, paged KV cache, model runner, sampler.

Heavy modules are imported on first use so `import longserve.engine` stays cheap.
"""

from .errors import CapacityError, EngineError, ModelLoadError, RequestError
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "EngineError", "ModelLoadError", "RequestError", "CapacityError"]


def __getattr__(name):
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "EngineConfig":
        from .config import EngineConfig
        return EngineConfig
    raise AttributeError(name)

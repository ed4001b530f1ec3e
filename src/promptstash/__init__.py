"""promptstash: an LLM inference engine built around exact, reusable prompt caching."""

from promptstash.config import EngineConfig
from promptstash.engine.engine import Completion, Engine
from promptstash.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "SamplingParams"]
__version__ = "0.1.0"

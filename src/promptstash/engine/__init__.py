from promptstash.engine.engine import Completion, Engine, EngineStats, Timings, Usage

__all__ = ["Completion", "Engine", "EngineStats", "Timings", "Usage"]

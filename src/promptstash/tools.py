"""Tool calling: tool definitions, the calls a model makes, and the model's tool-call text format.

CONTRACT (shared by the chat template rendering, the grammar and both APIs):
- ToolDef: one function the model may call (name, description, JSON-schema parameters); ttl_class marks an
  Anthropic cache_control breakpoint right after this tool's definition in the prompt.
- ToolCall: one call, with arguments as JSON text (as OpenAI sends and returns them).
- The model writes calls in the Hermes / Qwen2.5 format the chat template teaches it:

      <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>

  parse_tool_calls(text) splits finished output into (content, calls); ToolCallStream does it incrementally
  for streaming (text deltas, then per call: its name once known, then argument deltas).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"


@dataclass(frozen=True, eq=False)
class ToolDef:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    ttl_class: str | None = None  # a cache breakpoint right after this tool's definition (Anthropic cache_control)

    def template_json(self) -> dict[str, Any]:
        """The OpenAI-style function definition chat templates expect:
        {"type": "function", "function": {"name", "description", "parameters"}}."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

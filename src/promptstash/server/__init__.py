"""The HTTP server: OpenAI- and Anthropic-compatible routes over one engine."""

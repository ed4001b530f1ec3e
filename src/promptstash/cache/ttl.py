"""TTL classes of explicit cache writes (Anthropic cache_control ttl, OpenAI prompt_cache_retention="24h")."""

TTL_SECONDS: dict[str, float] = {"5m": 300.0, "1h": 3600.0, "24h": 86400.0}

"""promptstash: exact, reusable prompt caching."""

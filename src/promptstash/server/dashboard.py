"""The /dashboard page: one static HTML file with inline JS and hand-drawn SVG (no CDN, no build step).

It polls /v1/cache/stats, /v1/cache/requests and /v1/cache/prefixes every 2 s. With API keys configured,
open it as /dashboard?key=KEY (the key is sent as a Bearer token to the per-tenant endpoints).
"""

from pathlib import Path

DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")

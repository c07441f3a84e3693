"""HTTP routes: `search` (POST /v1/search), `images` (/v1/images…), `status` (health, readiness,
metrics, service info)."""

"""Prometheus metrics of one app instance (own registry, so several apps can live in one process).

    netvlad_http_requests_total{method, route, status}     requests answered
    netvlad_http_request_seconds{method, route}            latency histogram
    netvlad_batch_photos / netvlad_batch_seconds           photos and time per forward pass
    netvlad_index_images                                    images in the index
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("netvlad_http_requests", "HTTP requests answered.",
                                ("method", "route", "status"), registry=self.registry)
        self.latency = Histogram("netvlad_http_request_seconds", "HTTP request latency (seconds).",
                                 ("method", "route"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_photos = Histogram("netvlad_batch_photos", "Photos per forward pass of the model.",
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.batch_seconds = Histogram("netvlad_batch_seconds", "Duration of one forward pass (seconds).",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.index_images = Gauge("netvlad_index_images", "Images in the index.", registry=self.registry)

    def observe_batch(self, photos: int, seconds: float) -> None:
        self.batch_photos.observe(photos)
        self.batch_seconds.observe(seconds)

    def track_index_size(self, size: Callable[[], float]) -> None:
        self.index_images.set_function(size)


class RequestMetrics:
    """ASGI middleware counting requests and timing them per route template (`/v1/images/{image_id}`,
    not one series per id; unmatched paths are counted as `unmatched`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)

"""MicroBatcher: concurrent requests share forward passes, a lone request does not wait, results
go back to the right request, and errors reach every request of the failed batch; in the service,
every forward pass runs on its one compute thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.batcher import MicroBatcher
from service.settings import Settings
from service_support import INDEXED, small_index


class Recorder:
    """A stand-in network: descriptor of a photo = its first pixel value; records batch sizes and
    the thread each pass runs on; each pass takes `seconds`."""

    def __init__(self, seconds: float = 0.05, fail_on: float | None = None):
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, photos: list[torch.Tensor]) -> np.ndarray:
        self.batches.append(len(photos))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        values = np.array([[float(p.flatten()[0])] for p in photos], dtype=np.float32)
        if self.fail_on is not None and self.fail_on in values:
            raise RuntimeError("the network failed")
        return values


def photo(value: float) -> torch.Tensor:
    return torch.full((3, 4, 4), value)


async def with_batcher(recorder: Recorder, body, **kwargs):
    batcher = MicroBatcher(recorder, **kwargs)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()


def test_concurrent_requests_share_passes_and_get_their_own_rows():
    recorder = Recorder()

    async def body(batcher):
        async def decoding(i):  # like a request decoding its upload in a worker thread
            await asyncio.sleep(0.001 * (i % 3))
            return [photo(i), photo(i + 0.5)]

        return await asyncio.gather(*(batcher.describe(decoding(i)) for i in range(10)))

    results = asyncio.run(with_batcher(recorder, body, max_wait_s=0.02))
    for i, rows in enumerate(results):
        np.testing.assert_array_equal(rows[:, 0], [i, i + 0.5])
    assert sum(recorder.batches) == 20
    assert len(recorder.batches) <= 3, recorder.batches  # not one pass per request
    assert recorder.threads == {"netvlad-inference_0"}  # off the event loop, one worker


def test_a_lone_request_does_not_wait_for_others():
    recorder = Recorder(seconds=0.0)

    async def body(batcher):
        start = time.perf_counter()
        await batcher.describe([photo(1)])
        return time.perf_counter() - start

    assert asyncio.run(with_batcher(recorder, body, max_wait_s=1.0)) < 0.5


def test_the_wait_for_a_slow_request_is_bounded():
    recorder = Recorder(seconds=0.0)

    async def body(batcher):
        async def slow():
            await asyncio.sleep(0.5)
            return [photo(2)]

        late = asyncio.create_task(batcher.describe(slow()))
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        await batcher.describe([photo(1)])
        waited = time.perf_counter() - start
        await late
        return waited

    waited = asyncio.run(with_batcher(recorder, body, max_wait_s=0.05))
    assert 0.04 < waited < 0.3 and recorder.batches == [1, 1]


def test_max_batch_splits_and_disabled_batching_runs_each_request_alone():
    for kwargs, expected in (({"max_batch": 4}, 3), ({"enabled": False}, 10)):
        recorder = Recorder(seconds=0.02)

        async def body(batcher):
            return await asyncio.gather(*(batcher.describe([photo(i)]) for i in range(10)))

        asyncio.run(with_batcher(recorder, body, max_wait_s=0.02, **kwargs))
        assert len(recorder.batches) >= expected and max(recorder.batches) <= kwargs.get("max_batch", 1)


def test_an_error_reaches_every_request_of_its_batch_only():
    recorder = Recorder(seconds=0.05, fail_on=3.0)

    async def body(batcher):
        first = asyncio.create_task(batcher.describe([photo(0)]))  # runs alone, while the rest queue
        await asyncio.sleep(0.01)
        rest = await asyncio.gather(*(batcher.describe([photo(i)]) for i in (1, 2, 3)), return_exceptions=True)
        after = await batcher.describe([photo(4)])
        return await first, rest, after

    first, rest, after = asyncio.run(with_batcher(recorder, body, max_wait_s=0.02))
    assert first[0, 0] == 0 and after[0, 0] == 4
    assert all(isinstance(r, RuntimeError) for r in rest)
    assert recorder.batches == [1, 3, 1]


def test_an_empty_request_is_refused():
    with pytest.raises(ValueError):
        asyncio.run(with_batcher(Recorder(), lambda b: b.describe([])))


def test_the_service_runs_every_forward_pass_and_search_on_one_compute_thread(tmp_path_factory, real_photos):
    """torch's OpenMP pool is per calling thread: loading, searching and adding must all use one."""
    app = create_app(Settings(_env_file=None, index_dir=small_index(tmp_path_factory, real_photos, "compute"),
                              device="cpu"))
    threads: set[str] = set()
    with TestClient(app) as client:
        assert client.get("/v1/info").json()["micro_batching"] is False  # the default on CPU
        model = app.state.service.index.model
        model.register_forward_pre_hook(lambda module, args: threads.add(threading.current_thread().name))
        query = ("images", (real_photos[0].name, real_photos[0].read_bytes(), "image/jpeg"))
        found = client.post("/v1/search", files=[query], data={"top_k": "3"})
        assert found.status_code == 200 and found.json()["results"][0]["path"].endswith(real_photos[0].name)
        spare = real_photos[INDEXED]
        added = client.post("/v1/images", files=[("image", (spare.name, spare.read_bytes(), "image/jpeg"))])
        assert added.status_code == 201, added.text
    assert threads == {"netvlad-compute_0"}

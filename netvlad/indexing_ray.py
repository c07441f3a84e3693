"""Describing the pending photos of an index on a Ray cluster (`netvlad index --ray`).

The driver (the `netvlad index` process) scans and catalogues as `netvlad.indexing` does, then:

    Dataset[id, path] ─► map_batches(decode_rows, CPU tasks) ─► Dataset[id, pixels, reason]
      ─► map_batches(Describer, actor pool: model once per actor, num_gpus=1 on GPU clusters)
      ─► Dataset[id, descriptor, reason] ─► iter_batches on the driver ─► Index.store_descriptors

Rows are keyed by catalog id and are committed by the driver only: an actor killed mid-batch is
restarted and its batch retried (Ray), a duplicate row is dropped, and a driver killed mid-run
leaves the rest `pending` for the next run. Workers read photos from the paths the driver sees
(a filesystem all nodes mount at the same place), or from `read_from`/<relative path> on any
filesystem pyarrow opens (``s3://bucket/photos``); they load the model from the index folder's
``model.pt``, so the index folder must be on the shared filesystem too.
Ray is imported here only; without it `--ray` is one line naming the `distributed` extra.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np
import torch
from tqdm.auto import tqdm

from netvlad.batching import PhotoDataset, ShapeBatch, collate_by_shape, describe_batches, shape_batches
from netvlad.errors import ImageError, NetVLADError
from netvlad.indexfolder import MODEL
from netvlad.modelfile import load_model
from netvlad.transforms import Preprocess

if TYPE_CHECKING:
    from netvlad.index import Index
    from netvlad.indexing import IndexingReport

#: Seconds to wait for a cluster address to accept a connection before giving up.
CONNECT_TIMEOUT_S = 5.0
#: Blocks of the input Dataset per cluster CPU: a describe task returns its block's rows all at
#: once, so small blocks keep results (commits, the progress bar) flowing.
BLOCKS_PER_CPU = 16
#: Most batches in one block (a task's share, retried as a whole).
BLOCK_BATCHES = 64
#: Placeholder pixels of a photo that failed to decode (uint8 (3, 1, 1)).
NO_PIXELS = np.zeros((3, 1, 1), np.uint8)


@dataclass
class RayOptions:
    """How to run on Ray. `address`: ``auto`` (the cluster `ray start` runs on this node),
    ``local`` (a private one-node Ray in this process) or ``HOST:PORT`` / ``ray://HOST:PORT``;
    `concurrency`: describe actors (None: one per GPU, or per CPU on clusters without GPUs);
    `batch_size`: photos per batch;
    `read_from`: base URI workers read photos from (None: the driver's paths)."""

    address: str = "auto"
    concurrency: int | None = None
    batch_size: int = 16
    read_from: str | None = None

    def checked(self) -> "RayOptions":
        """These options, once Ray imports and an explicit address answers (one-line errors)."""
        import_ray()
        if self.address not in ("auto", "local"):
            _check_reachable(self.address)
        return self


def import_ray():
    """The `ray` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships in the same wheel, with pyarrow and pandas
    except ImportError as exc:
        raise NetVLADError(f"--ray needs Ray Data ({exc.name} is not installed): pip install netvlad[distributed]") from None
    return ray


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) nobody listens on, in seconds instead of Ray's minute."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise NetVLADError(f"--ray {address}: not an address (auto, local, HOST:PORT or ray://HOST:PORT)")
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise NetVLADError(f"--ray {address}: no Ray cluster reachable there ({exc.strerror or exc})") from None


@contextmanager
def ray_session(address: str):
    """Ray connected for the block: an already initialised Ray is used as it is (and left running);
    otherwise `address` is joined (or a local Ray started) and shut down afterwards. A local Ray talks
    over the loopback interface only (Ray otherwise binds to the machine's network address)."""
    if address == "local":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address not in ("auto", "local"):
        _check_reachable(address)
    try:
        ray.init(address=None if address == "local" else address, logging_level=logging.WARNING,
                 log_to_driver=False, include_dashboard=False)
    except ConnectionError as exc:
        hint = " (start one with `ray start --head`, or use --ray local)" if address == "auto" else ""
        raise NetVLADError(f"--ray {address}: {' '.join(str(exc).split())}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def decode_rows(batch: dict[str, np.ndarray], preprocess: Preprocess, max_pixels: int) -> dict[str, list]:
    """Ray task: rows (id, path) → (id, pixels uint8 (3, H, W) at the network's input size, reason);
    a photo that cannot be read or decoded gets `NO_PIXELS` and its `ImageError.reason`."""
    items, samples = [], []
    for key, path in zip(batch["id"].tolist(), batch["path"].tolist()):
        try:
            items.append((key, _read_uri(path) if "://" in path else path))
        except OSError as exc:
            samples.append((key, None, ImageError(path, f"unreadable ({exc})")))
    dataset = PhotoDataset(items, preprocess, max_pixels, pixels=True)
    samples += [dataset[i] for i in range(len(dataset))]
    return {"id": [key for key, _, _ in samples],
            "pixels": [NO_PIXELS if pixels is None else pixels.numpy() for _, pixels, _ in samples],
            "reason": [error.reason if error is not None else "" for _, _, error in samples]}


def _read_uri(uri: str) -> bytes:
    """The bytes of a file on any filesystem pyarrow opens (s3://, gs://, hdfs://, file://)."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_file(path) as handle:
        return handle.read()


class Describer:
    """Ray actor (a callable class for `map_batches`): rows (id, pixels, reason) → rows (id,
    descriptor (dim,) float32 unit norm, reason), photos of one shape through the network
    together. The model is loaded once per actor, from the index folder's model file."""

    def __init__(self, model_path: str, device: str, amp: bool | None):
        self.model = load_model(model_path, device)
        self.amp = amp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = [(key, torch.from_numpy(np.asarray(pixels)), None) if not reason
                   else (key, None, ImageError(str(key), reason))
                   for key, pixels, reason in zip(batch["id"].tolist(), batch["pixels"], batch["reason"].tolist())]
        shapes, failures = collate_by_shape(samples)
        normalize = self.model.preprocess.normalize
        shapes = [ShapeBatch(shape.keys, normalize(shape.images)) for shape in shapes]
        ((keys, descriptors, failures),) = describe_batches(self.model, [(shapes, failures)], self.amp,
                                                             network_errors=True)
        return {
            "id": np.asarray(keys + [key for key, _ in failures], np.int64),
            "descriptor": np.concatenate([descriptors, np.zeros((len(failures), self.model.dim), np.float32)]),
            "reason": np.asarray([""] * len(keys) + [error.reason for _, error in failures], object),
        }


def pending_table(index: Index, pending: list[tuple], batch_size: int, read_from: str | None, blocks: int) -> list:
    """`pending` photos (`Catalog.pending` rows) as pyarrow tables (id int64, path string), rows
    grouped by predicted input shape (`shape_batches`), split into about `blocks` tables of whole
    batches (at most `BLOCK_BATCHES` each)."""
    import pyarrow as pa

    preprocess = index.model.preprocess
    shapes = [preprocess.output_shape(w, h) if w and h else None for _, _, _, w, h in pending]
    order = [i for batch in shape_batches(shapes, batch_size) for i in batch]
    ids = [pending[i][0] for i in order]
    paths = [_worker_path(index, pending[i][1], pending[i][2], read_from) for i in order]
    rows = batch_size * min(BLOCK_BATCHES, max(1, -(-len(order) // (batch_size * blocks))))
    return [pa.table({"id": pa.array(ids[s : s + rows], pa.int64()), "path": pa.array(paths[s : s + rows], pa.string())})
            for s in range(0, len(order), rows)]


def _worker_path(index: Index, path: str, origin: str, read_from: str | None) -> str:
    """Where workers read a catalogued photo: `read_from`/path for folder photos, else the driver's path."""
    if read_from is not None and origin == "folder":
        return f"{read_from.rstrip('/')}/{path}"
    return str(index.resolve(path, origin))


def describe_pending_ray(index: Index, report: IndexingReport, options: RayOptions, progress: bool = True,
                         save_every: float = 600.0) -> None:
    """Describe every pending image of `index` on Ray and commit the results (fills `report`)."""
    pending = index.catalog.pending()
    if not pending:
        return
    index.prepare_evidence([str(index.resolve(path, origin)) for _, path, origin, _, _ in pending])
    with ray_session(options.address) as ray:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        tables = pending_table(index, pending, options.batch_size, options.read_from, blocks=BLOCKS_PER_CPU * cpus)
        expected = np.concatenate([table["id"].to_numpy() for table in tables])
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # the driver's bar says it all
        ray.data.DataContext.get_current().enable_progress_bars = False
        results = ray.data.from_arrow(tables).map_batches(
            decode_rows, batch_size=options.batch_size, batch_format="numpy",
            fn_kwargs={"preprocess": index.model.preprocess, "max_pixels": index.max_pixels},
        ).map_batches(
            Describer, batch_size=options.batch_size, batch_format="numpy", num_gpus=1 if gpus else 0,
            compute=ray.data.ActorPoolStrategy(size=min(options.concurrency or gpus or cpus, len(tables))),
            fn_constructor_kwargs={"model_path": str(index.directory / MODEL), "device": "cuda" if gpus else "cpu",
                                   "amp": index.amp},
        )  # Ray Data restarts a dead actor and retries its batch (max_restarts=-1, max_task_retries=-1)
        commit_results(index, report, results.iter_batches(batch_size=None, batch_format="numpy"), expected,
                       progress, save_every)


def commit_results(index: Index, report: IndexingReport, batches, expected: np.ndarray, progress: bool,
                   save_every: float) -> None:
    """Store each result batch (id, descriptor, reason) in the index, once per id of `expected`
    (int64 (n,)); failures are marked failed with their reasons; the faiss index is saved every
    `save_every` seconds."""
    done = np.zeros(int(expected.max()) + 1, bool)  # one byte per catalog id: 10 MB at 10 M photos
    last_save = time.monotonic()
    with tqdm(total=len(expected), desc="describe (ray)", unit="img", disable=not progress, smoothing=0.05) as bar:
        for batch in batches:
            fresh = ~done[batch["id"]]
            ids, reasons = batch["id"][fresh], batch["reason"][fresh]
            done[ids] = True
            ok = reasons == ""
            if ok.any():
                index.store_descriptors(ids[ok].tolist(), batch["descriptor"][fresh][ok])
                report.described += int(ok.sum())
            if not ok.all():
                index.mark_failed(list(zip(ids[~ok].tolist(), reasons[~ok].tolist())))
                report.failed += int((~ok).sum())
            bar.update(len(fresh))
            if time.monotonic() - last_save > save_every:
                index.save()
                last_save = time.monotonic()

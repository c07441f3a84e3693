"""Migrating a schema-1 catalog, which kept each descriptor as a float16 BLOB in ``images``, to
descriptor shards (`netvlad.descriptorstore`), once, when a writer opens the folder.

Blobs move a shard at a time: each shard is written, then its reference is committed together
with clearing those blobs, so a migration killed at any point resumes where it stopped (an
unreferenced shard file is swept by `DescriptorStore.recover`). When no blob is left the column
is dropped, the schema version set to 2 and the file vacuumed to give the space back.
"""

from __future__ import annotations

import logging

import numpy as np

from netvlad.catalog import SCHEMA_VERSION
from netvlad.descriptorstore import DTYPE, DescriptorStore

log = logging.getLogger(__name__)


def _columns(store: DescriptorStore) -> set[str]:
    return {row[1] for row in store.catalog.connection.execute("PRAGMA table_info(images)")}


def migrate(store: DescriptorStore) -> int:
    """Move the BLOB descriptors of `store`'s catalog into shards; returns how many moved (0 for
    a catalog of the current schema)."""
    catalog = store.catalog
    if int(catalog.get_meta("schema_version")) == SCHEMA_VERSION:
        return 0
    with catalog.transaction() as conn:
        if "shard" not in _columns(store):
            conn.execute("ALTER TABLE images ADD COLUMN shard INTEGER")
            conn.execute("ALTER TABLE images ADD COLUMN row INTEGER")
    log.warning("%s: moving descriptors out of the catalog into %s (once; resumable)", catalog.path, store.folder)
    moved = 0
    while "descriptor" in _columns(store):
        rows = catalog.connection.execute(
            "SELECT id, descriptor FROM images WHERE descriptor IS NOT NULL AND status='indexed' ORDER BY id LIMIT ?",
            (store.shard_rows,)).fetchall()
        with catalog.transaction() as conn:
            if not rows:
                conn.execute("UPDATE images SET descriptor=NULL")
                conn.execute("ALTER TABLE images DROP COLUMN descriptor")
                break
            ids = [image_id for image_id, _ in rows]
            store.append(ids, np.stack([np.frombuffer(blob, dtype=DTYPE) for _, blob in rows]))
            conn.executemany("UPDATE images SET descriptor=NULL WHERE id=?", ((i,) for i in ids))
        moved += len(rows)
    catalog.set_meta("schema_version", SCHEMA_VERSION)
    catalog.connection.execute("VACUUM")
    log.warning("%s: moved %d descriptors into shard files", catalog.path, moved)
    return moved

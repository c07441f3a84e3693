"""Service settings from environment variables (prefix ``NETVLAD_``) or a ``.env`` file.

    NETVLAD_INDEX_DIR=demo/index NETVLAD_API_KEY=secret netvlad serve ...
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


#: What an API key may hold: visible ASCII (HTTP header values are ASCII and trimmed of spaces).
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")


class Settings(BaseSettings):
    """Everything the app reads at start-up; sizes in bytes, pixels as width × height."""

    model_config = SettingsConfigDict(env_prefix="NETVLAD_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)  # never echo a key into a log

    index_dir: Path = Field(Path("index"), description="Index folder (faiss index + catalog + manifest).")
    model: str | None = Field(None, description="Model file or built-in name; must be the index's model "
                              "(default: the model stored in the index folder).")
    api_key: SecretStr | None = Field(None, description="When set, writes need header `X-API-Key: <key>`: "
                                      "printable ASCII without spaces (an empty value means no key).")
    allow_writes: bool = Field(True, description="Accept adding and deleting photos through the API.")
    protect_reads: bool = Field(False, description="Also require the API key for searches and reads.")
    protect_status: bool = Field(False, description="Also require the API key for /v1/info and /metrics "
                                 "(off: they stay open for monitoring; /healthz and /readyz are always open).")
    max_upload_bytes: int = Field(20_000_000, gt=0, description="Largest accepted upload, per file.")
    max_request_bytes: int = Field(64_000_000, gt=0, description="Largest search request body (all its photos "
                                   "together); adding a photo accepts one file of max_upload_bytes.")
    max_pixels: int = Field(50_000_000, gt=0, description="Largest accepted image (width × height).")
    decode_memory_bytes: int = Field(256_000_000, gt=0, description="Memory all photo decodes in progress "
                                     "may hold together (4 bytes a decoded pixel); decodes wait for room, "
                                     "and a photo that alone needs more is refused with 413.")
    max_query_images: int = Field(16, gt=0, description="Most photos in one search request.")
    max_top_k: int = Field(100, gt=0, description="Largest `top_k` a search may ask for.")
    max_rerank_k: int = Field(200, gt=0, description="Largest `rerank_k` (candidates re-ranked with local "
                              "evidence) a search may ask for: it bounds the re-ranking time of one search.")
    device: str | None = Field(None, description="torch device for the model (cpu, cuda, cuda:1, …; "
                               "default: cuda when available).")
    micro_batching: bool | None = Field(None, description="Let concurrent searches share forward passes "
                                        "(default: on with CUDA; off on CPU, where one photo already keeps "
                                        "every core busy and bigger passes were measured slower).")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a search waits for others to share its forward pass.")
    max_batch: int = Field(32, gt=0, description="Most photos in one forward pass.")
    mmap_index: bool = Field(False, description="Memory-map the faiss index instead of reading it (large IVF "
                             "indexes serve in little RAM); applies when the index is served read-only.")

    @field_validator("api_key", "model", "device", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """`NETVLAD_API_KEY=` (empty, as compose passes an unset variable) means no key; the same
        for the model (the index's own) and the device (cuda when available)."""
        return None if value is None or value == "" else value

    @field_validator("model", "device", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        """Refuse at start-up a key that would silently turn auth off (blank) or that no client can
        send (outside printable ASCII, or with spaces that HTTP strips)."""
        if value is not None and not KEY_PATTERN.fullmatch(value.get_secret_value()):
            raise ValueError("NETVLAD_API_KEY must be printable ASCII without spaces (letters, digits, "
                             "punctuation); leave it empty for no key")
        return value

"""``raytumor serve`` settings (no Ray import: the CLI builds its parser from these)."""

from __future__ import annotations

from dataclasses import dataclass

from raytumor import volumes
from raytumor.config import check_bind, opt, read_token


@dataclass
class ServeConfig:
    bundle: str = opt(help="model bundle: a directory or s3://|gs:// URI", required=True)
    host: str = opt("127.0.0.1", "address to bind; anything but loopback needs --token-file")
    port: int = opt(8000, "HTTP port")
    token_file: str | None = opt(None, "file holding the bearer token requests must carry")
    max_request_bytes: int = opt(256 << 20, "larger request bodies get 413 (a 512x512x400 volume is ~200 MB)")
    request_timeout_s: float = opt(60.0, "a request not answered by then gets 504")
    replicas: int | None = opt(None, "replicas (default: one per GPU, else sized from the CPUs)")
    max_batch_size: int = opt(8, "requests batched into one forward pass")
    batch_wait_ms: float = opt(10.0, "how long a replica waits to fill a batch")
    s3_endpoint: str | None = opt(None)
    score_out_of_scope: bool = opt(
        False, "label inputs outside the bundle's scope anyway (in_scope stays false)"
    )
    min_foreground: float = opt(0.05, "volumes: skip slices with less head than this share")
    volume_skip_top_mm: float = opt(volumes.DEFAULT_SKIP_TOP_MM, "volumes: as raytumor score")
    volume_depth_mm: float = opt(volumes.DEFAULT_DEPTH_MM, "volumes: as raytumor score")
    volume_min_extent_mm: float = opt(volumes.DEFAULT_MIN_EXTENT_MM, "volumes: as raytumor score")

    def __post_init__(self) -> None:
        check_bind(self.host, self.token_file)
        if self.max_request_bytes < 1 or self.request_timeout_s <= 0 or self.max_batch_size < 1:
            raise ValueError("--max-request-bytes, --request-timeout-s and --max-batch-size must be positive")

    def token(self) -> str | None:
        return read_token(self.token_file)

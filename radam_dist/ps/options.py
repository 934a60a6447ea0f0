"""How one shard serves: the ``radam-ps serve`` flags as one object (``cli.serve`` builds it).

Its own module so that every part of the server (recovery, the round coordinator, the wire
reader, checkpointing) can take it without importing the servicer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from radam_dist.ps.tensors import DEFAULT_CHUNK_BYTES


@dataclass
class ServeOptions:
    mode: str = "async"  # "sync" | "async"
    num_workers: int = 1  # sync: gradients per round
    sync_timeout: float = 60.0
    max_staleness: int = 16  # async; -1: unlimited
    shard_index: int = 0
    num_shards: int = 1
    nonfinite: str = "reject"  # "reject" | "skip"
    max_request_bytes: int = 1 << 31
    max_inflight_bytes: int = 4 << 30  # all calls together (RESOURCE_EXHAUSTED beyond)
    checkpoint_dir: Optional[Path] = None
    checkpoint_interval: float = 0.0  # seconds; 0: only on request / SIGTERM
    keep_checkpoints: int = 2
    wal: bool = False
    discard_damaged_state: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # gradient receive buffers kept for reuse once idle (tensors.BufferPool); 0: fresh each push
    receive_buffer_bytes: int = 1 << 30
    # sync over several shards: the key the job's servers share (rounds.DecisionSigner)
    server_key: Optional[bytes] = None
    stream_idle_timeout: float = 30.0  # seconds a client stream may send nothing; 0: no limit
    wal_mark_interval: float = 1.0  # seconds between wal.mark writes (the server's timer)

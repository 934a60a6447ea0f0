"""What a shard keeps on disk: checkpoints, the write-ahead log, ``wal.mark``, the directory
lock. Byte layouts, checksums and the recovery rules are in FORMATS.md beside this file.

Nothing here knows about gRPC, the optimizer or sync rounds (only numpy and the dtype names of
``radam_dist.ps.tensors``); the server's recovery (``radam_dist.ps.recovery``) and
checkpointing (``radam_dist.ps.checkpointer``) decide what to write and when.
"""

from __future__ import annotations

from radam_dist.ps.storage.checkpoints import (CKPT_MAGIC, CKPT_RE, TEMP_RE, checkpoint_version,
                                              list_checkpoints, load_checkpoints,
                                              load_latest_checkpoint, read_checkpoint,
                                              space_needed, sweep_temp_files, write_checkpoint)
from radam_dist.ps.storage.errors import (DISCARD_HINT, DirectoryLockedError, RecoveryError,
                                         WalBrokenError)
from radam_dist.ps.storage.lock import LOCK_NAME, DirectoryLock
from radam_dist.ps.storage.mark import WAL_MARK_NAME, WalMark
from radam_dist.ps.storage.wal import (WAL_HEAD, WAL_HEADER, WAL_OLD_MARK, WAL_RE, WAL_RECORD_MARK,
                                      WAL_TRAILER, WAL_TRAILER_MARK, Damage, WalRecord,
                                      WriteAheadLog, decode_record, encode_record, scan_segment)

__all__ = ["CKPT_MAGIC", "CKPT_RE", "TEMP_RE", "checkpoint_version", "list_checkpoints",
           "load_checkpoints", "load_latest_checkpoint", "read_checkpoint", "space_needed",
           "sweep_temp_files", "write_checkpoint", "DISCARD_HINT", "DirectoryLockedError",
           "RecoveryError", "WalBrokenError", "LOCK_NAME", "DirectoryLock", "WAL_MARK_NAME",
           "WalMark", "WAL_HEAD", "WAL_HEADER", "WAL_OLD_MARK", "WAL_RE", "WAL_RECORD_MARK",
           "WAL_TRAILER", "WAL_TRAILER_MARK", "Damage", "WalRecord", "WriteAheadLog",
           "decode_record", "encode_record", "scan_segment"]

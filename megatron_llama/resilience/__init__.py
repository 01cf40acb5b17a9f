"""Job-level fault tolerance, below the training loop and free of torch.

- `lock`: one writer per checkpoint directory (a lock file with its holder, an flock where
  the filesystem has one, a heartbeat where it does not).
- `watchdog`: hang detection per rank (no progress for ``--hang-timeout`` -> every thread's
  Python stack, then a non-zero exit so the scheduler restarts the job).
- `integrity`: a checksum of every file of a checkpoint, written at save and verified
  before a checkpoint is loaded or converted.
"""

"""One run per ``--save``: an advisory lock held by rank 0 for the life of the run.

Two jobs writing one folder overwrite each other's checkpoints and interleave their metrics,
and both report success. So rank 0 takes ``flock`` on ``{save}/.lock`` before it writes
anything there, and keeps it until the run ends. The kernel drops the lock when the holder's
process ends, however it ends, so a crashed or killed run never blocks the next one; the
file's text (host, pid, start time) is only there to name the holder. On shared file systems
this needs a mount that supports ``flock`` (NFSv4 does; Lustre needs ``-o flock``).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from megatron_glm.checkpoint.format import LOCK, CheckpointError


class SaveLock:
    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, LOCK)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip() or "a process"
            self.release()
            raise CheckpointError(
                f"--save {folder} is in use by another run ({holder}): wait for it to end, "
                "or give this run another --save"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(
            self._fd,
            f"host {socket.gethostname()}, pid {os.getpid()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )

    def release(self) -> None:
        """Unlock (closing the file does it); the file stays, so a waiting opener never locks an unlinked one."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_save_folder(folder: str | None, rank: int) -> SaveLock | None:
    """Rank 0 takes the lock; every rank raises the same error when another run holds it."""
    import torch.distributed as dist

    held, problem = None, None
    if folder and rank == 0:
        try:
            held = SaveLock(folder)
        except CheckpointError as e:
            problem = str(e)
    if folder and dist.is_initialized() and dist.get_world_size() > 1:
        message = [problem]
        dist.broadcast_object_list(message, src=0)
        problem = message[0]
    if problem:
        raise CheckpointError(problem)
    return held

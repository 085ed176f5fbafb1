"""Worker for tests/test_restart.py, run under ``torchrun --max-restarts 1``: the training command
(``python -m medix_fast.train`` with the arguments after MARK), where rank 1 kills itself (SIGKILL)
right after step 2's checkpoint is published, once: the file MARK says it did, so the restarted
attempt runs through.

    torchrun --max-restarts 1 ... restart_worker.py MARK train.steps=3 ... --resume
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from medix_fast import checkpoint as C
from medix_fast import train


def main(mark: Path, argv: list[str]) -> int:
    save = train.Trainer.save

    def save_then_die(self, hf: bool = False) -> Path:
        path = save(self, hf)
        if self.info.rank == 1 and self.step == 2 and not mark.exists():
            while C.latest_checkpoint(self.out) != path:  # rank 0 publishes it
                time.sleep(0.05)
            mark.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    train.Trainer.save = save_then_die
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))

"""`ropebert fit` whose checkpoint writer is killed (SIGKILL) in the middle of its KILL_AT_WRITE-th file: the
previous checkpoint must stay loadable. Run by test_train.py as `python kill_in_write.py FIT_ARGS...`."""

import os
import signal
import sys

from ropebert.pipelines.train import strategy

real = strategy.AtomicCheckpointIO._write
count = {"n": 0}


def killing_write(checkpoint, f):
    count["n"] += 1
    if count["n"] == int(os.environ["KILL_AT_WRITE"]):
        f.write(b"\x80\x02half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(checkpoint, f)


if __name__ == "__main__":
    strategy.AtomicCheckpointIO._write = staticmethod(killing_write)
    from ropebert.pipelines.train.fit import main

    main(sys.argv[1:])

"""A background tokenizer process, `python -m lingua_wd.data.worker`, started by TrainLoader.

It reads `(data spec, tokenizer, {lane: state}, windows per message)` pickled on stdin, then makes
windows for its lanes round-robin, forever, writing pickled messages
    ("data", lane, windows (k, seq_len+1) int32 or None, [lane state after each window], [warnings],
     the lane's state if it turned out dry (no usable document left in any source) else None)
to its stdout pipe, whose capacity is the prefetch depth (a full pipe blocks it); a dry lane is
dropped. An error is sent as ("error", is_config_error, message). It imports no torch, exits when the pipe closes (the loader
closed it, or the training process died), and ignores the signals meant for the trainer (SIGINT,
SIGTERM, SIGUSR1): the trainer decides when to stop and checkpoints without the workers.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback

import numpy as np


def serve(out) -> None:
    from lingua_wd.data.lanes import Lane, LaneDry

    data, tokenizer, states, per_msg = pickle.load(sys.stdin.buffer)
    lanes = [Lane(lane, data, tokenizer, state) for lane, state in states.items()]
    parent, size = os.getppid(), 1
    while lanes and os.getppid() == parent:
        for lane in list(lanes):
            windows, after, dry = [], [], False
            try:
                for _ in range(size):
                    windows.append(lane.next_window())
                    after.append(lane.state())
            except LaneDry:
                dry = True
                lanes.remove(lane)
            stacked = np.stack(windows) if windows else None
            msg = ("data", lane.id, stacked, after, lane.pop_warnings(), lane.state() if dry else None)
            pickle.dump(msg, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
        size = min(2 * size, per_msg)  # small first messages: the first batch comes quickly


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints of libraries go to stderr, not into the message pipe
    try:
        serve(out)
    except (BrokenPipeError, EOFError):  # the loader is gone
        pass
    except Exception as err:
        config = type(err).__name__ == "ConfigError"
        try:
            pickle.dump(("error", config, str(err) if config else traceback.format_exc()), out)
            out.flush()
        except BrokenPipeError:
            pass
    os._exit(0)  # skip interpreter teardown: flushing a closed pipe would only print noise


if __name__ == "__main__":
    main()

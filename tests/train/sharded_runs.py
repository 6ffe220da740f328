"""Train each config given, one after another, in every process of one torchrun launch
(tests/train/test_fsdp.py launches it once for several runs).

    torchrun --nproc_per_node 2 tests/train/sharded_runs.py a.yaml b.yaml [--resume] [--die-after-eval]

--die-after-eval: every process exits at once after the first evaluation (its checkpoint is
written by then), as a killed run would: no report, no cleanup.
"""

from __future__ import annotations

import os
import sys

from deltatune.train.config import load_config
from deltatune.train.loop import train


def main(argv: list[str]) -> None:
    die = "--die-after-eval" in argv

    def on_evaluate(step: int, metrics: dict[str, float]) -> None:
        if die:
            os._exit(9)

    for path in (a for a in argv if not a.startswith("--")):
        train(load_config(path), resume="--resume" in argv, on_evaluate=on_evaluate)


if __name__ == "__main__":
    main(sys.argv[1:])

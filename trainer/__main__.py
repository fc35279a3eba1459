"""`python -m trainer JOB.json`: the entry point `train --nproc N` starts in every process (see trainer.distributed)."""

import sys

from common.console import report
from common.errors import BlockgraphError, UsageError
from common.files import FileKind, MiB
from common.records import read_record
from trainer.config import TrainConfig
from trainer.distributed import Job
from trainer.loop import train

if len(sys.argv) != 2:
    sys.exit("usage: python -m trainer JOB.json (written by `blockgraph train --nproc N`)")
try:
    job = read_record(sys.argv[1], Job, FileKind("training job", UsageError, limit=16 * MiB))
    train(TrainConfig(**job.config), job.out, resume=job.resume, quiet=job.quiet)
except BlockgraphError as error:
    report(error)
    sys.exit(1)

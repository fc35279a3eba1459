"""`python -m blockgraph.trainer JOB.json`: what `train --nproc N` starts in every process (see trainer.distributed)."""

import sys

from blockgraph.builder.plugins import activate
from blockgraph.common.console import report
from blockgraph.common.errors import BlockgraphError, UsageError
from blockgraph.common.files import FileKind, MiB
from blockgraph.common.records import check_record, read_record
from blockgraph.trainer.config import TrainConfig
from blockgraph.trainer.distributed import Job
from blockgraph.trainer.loop import train

if len(sys.argv) != 2:
    sys.exit("usage: python -m blockgraph.trainer JOB.json (written by `blockgraph train --nproc N`)")
try:
    kind = FileKind("training job", UsageError, limit=16 * MiB)
    job = read_record(sys.argv[1], Job, kind)
    config = check_record(job.config, TrainConfig, kind, sys.argv[1], field="config")
    activate(job.plugins)  # the blocks the launcher had: named by the user who started it
    train(config, job.out, resume=job.resume, quiet=job.quiet, locked=job.locked)
except BlockgraphError as error:
    report(error)
    sys.exit(1)

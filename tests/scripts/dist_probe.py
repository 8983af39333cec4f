"""Run under torchrun: records what trainguard.distributed says on each rank, before and after init."""

import json
import sys
from pathlib import Path

from trainguard import distributed

out = Path(sys.argv[1])
before = {
    "rank": distributed.rank(),
    "world_size": distributed.world_size(),
    "local_rank": distributed.local_rank(),
    "is_main": distributed.is_main_process(),
}
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
r = distributed.rank()
after = {
    "rank": r,
    "world_size": distributed.world_size(),
    "is_main": distributed.is_main_process(),
    "is_local_main": distributed.is_local_main_process(),
    "any_only_rank1": distributed.any_rank(r == 1),
    "any_none": distributed.any_rank(False),
    "all_only_rank0": distributed.all_ranks(r == 0),
    "all_every": distributed.all_ranks(True),
    "broadcast": distributed.broadcast_object({"from": r}, src=1),
}
distributed.barrier()
(out / f"rank{r}.json").write_text(json.dumps({"before": before, "after": after}))
dist.destroy_process_group()

"""Run by the stream tests in real processes (alone or under torchrun with gloo).

usage: stream_worker.py DATASET OUT.json MODE [STATE.json] [STOP_AFTER]
MODE: epochs  -> ids of two epochs and of a second loader with the same seed
      partial -> consume STOP_AFTER batches, write ids and the (global) resume state
      resume  -> load STATE.json and write the ids of the rest of the epoch
"""

import json
import sys

import torch.distributed as dist

from signscale.data.stream import open_stream
from signscale.training import distributed


def main() -> None:
    dataset, out, mode = sys.argv[1:4]
    distributed.init(backend="gloo")
    rank, world = distributed.rank(), distributed.world_size()
    kw = dict(num_workers=2, batch_size=8, block_size=4, window_blocks=2, seed=11, rank=rank, world_size=world)
    result: dict = {"rank": rank, "world": world}
    if mode == "epochs":
        loader = open_stream(dataset, **kw)
        result["epoch0"] = [i for b in loader for i in b["id"].tolist()]
        result["epoch1"] = [i for b in loader for i in b["id"].tolist()]
        result["again0"] = [i for b in open_stream(dataset, **kw) for i in b["id"].tolist()]
    elif mode == "partial":
        stop = int(sys.argv[5])
        loader = open_stream(dataset, **kw)
        ids = []
        for k, b in enumerate(loader):
            ids += b["id"].tolist()
            if k + 1 == stop:
                break
        states = distributed.all_gather_object(loader.local_state())
        result["ids"] = ids
        result["state"] = loader.state_dict(states, world)
    elif mode == "resume":
        loader = open_stream(dataset, **kw)
        loader.load_state_dict(json.load(open(sys.argv[4])))
        result["ids"] = [i for b in loader for i in b["id"].tolist()]
    gathered = distributed.all_gather_object(result)
    if rank == 0:
        json.dump(gathered, open(out, "w"))
    if dist.is_initialized():
        distributed.shutdown()


if __name__ == "__main__":
    main()

"""Worker: under torchrun (2 processes, TP=1 PP=1 -> DP=2) read ``count`` global batches of the training
data through the data module and NeMo's MegatronDataSampler; save each rank's samples per global batch."""

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    import torch.distributed as dist

    from nemo_minitron import parallel
    from nemo_minitron.data.blend import training_settings
    from nemo_minitron.data.module import GPTDataModule

    train, cache, out, count = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    parallel.initialize(1, 1)  # world 2 -> data-parallel 2
    settings = training_settings(train, 16, 2, 4)
    m = GPTDataModule(settings, cache)
    m.build(count, count, 0, 0)  # rank 0 builds the index, rank 1 waits and reads it
    it = iter(m.data_sampler.transform_dataloader(m.train_dataloader()))
    mine = [next(it)["tokens"].tolist() for _ in range(count)]  # 4 / (2 x DP 2) = 1 micro-batch per step
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({str(r): v for r, v in enumerate(every)}))
    parallel.destroy()

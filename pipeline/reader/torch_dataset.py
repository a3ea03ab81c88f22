"""The shards as a torch.utils.data.IterableDataset, read by pipeline.records (no TensorFlow):

    from torch.utils.data import DataLoader
    from pipeline.reader.torch_dataset import RecordsIterableDataset
    ds = RecordsIterableDataset("out/coco", "train", 64, shuffle=True, seed=0)
    for batch in DataLoader(ds, batch_size=None, num_workers=2):   # the dataset batches itself
        a = batch["patch_a"].permute(0, 3, 1, 2)                    # uint8 (B, C, P, P)
        offsets = batch["offsets"]                                  # float32 (B, 8), pixels

Every DataLoader worker (and, with rank / world_size, every process of a distributed job) reads its own
disjoint set of shards, so together they read each record once per epoch; call set_epoch(e) before
each epoch for a new shuffle order, as with DistributedSampler.
"""
from __future__ import annotations

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.reader import batching


class RecordsIterableDataset(IterableDataset):
    """Batches of a split as dicts of torch tensors (decode_batch's keys), or transform(numpy dict)."""

    def __init__(self, data_dir: str, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 repeat: bool = False, drop_remainder: bool = False,
                 shuffle_buffer: int = batching.DEFAULT_SHUFFLE_BUFFER, rank: int = 0, world_size: int = 1,
                 transform=None):
        super().__init__()
        self.source = batching.open_split(data_dir, split)
        self.batch_size, self.shuffle, self.seed, self.repeat = batch_size, shuffle, seed, repeat
        self.drop_remainder, self.shuffle_buffer = drop_remainder, shuffle_buffer
        self.rank, self.world_size, self.transform, self.epoch = rank, world_size, transform, 0
        self.source.subset(rank, world_size)  # fails now, not in a worker, when there are too few shards

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        part = self.rank * workers + worker
        source = self.source.subset(part, self.world_size * workers)
        stream = batching.iter_batches(source, self.batch_size, shuffle=self.shuffle,
                                       seed=[self.seed, self.epoch, part], repeat=self.repeat,
                                       drop_remainder=self.drop_remainder, shuffle_buffer=self.shuffle_buffer)
        for batch in stream:
            yield self.transform(batch) if self.transform else {k: torch.from_numpy(v) for k, v in batch.items()}

"""The shards as a keras.utils.PyDataset (Keras 3, any backend: JAX, PyTorch, TensorFlow), read by
pipeline.records, so no TensorFlow is needed:

    from pipeline.reader.keras_dataset import RecordsPyDataset
    train = RecordsPyDataset("out/coco", "train", 64, training=True, seed=0)
    val = RecordsPyDataset("out/coco", "validation", 64, training=False)
    model.fit(train, validation_data=val, epochs=10)

Batches are (inputs, labels) as HomographyNet takes them (batching.model_inputs: the two patches stacked
on channels in [-1, 1], offsets / rho), or whatever `transform(batch_dict)` returns.
"""
from __future__ import annotations

import threading

import keras

from pipeline.reader import batching


class RecordsPyDataset(keras.utils.PyDataset):
    """A split of a built dataset for Model.fit / evaluate / predict.

    training=True: an endless stream, shard order and a shuffle buffer reseeded every pass, full batches
      only; an epoch is num_examples // batch_size batches. The stream is already shuffled, so the
      index Keras asks for only counts batches (Keras's own index shuffling changes nothing).
    training=False: one pass in homography_index.json order, the last batch partial; batch i is the i-th batch,
      whatever order Keras asks in (predict lines up with the records).
    reader_workers: processes that read and decode shards (pipeline.records); prefer them to Keras's
      `workers`, which only add threads around one stream (thread-safe; use_multiprocessing is refused).
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, *, training: bool = True, seed=None,
                 shuffle_buffer: int = batching.DEFAULT_SHUFFLE_BUFFER, reader_workers: int = 0,
                 transform=None, **kwargs):
        if kwargs.get("use_multiprocessing"):
            raise ValueError("RecordsPyDataset reads one stream: use reader_workers=N, not use_multiprocessing")
        super().__init__(**kwargs)
        self.source = batching.open_split(data_dir, split)
        self.batch_size, self.training, self.seed = batch_size, training, seed
        self.shuffle_buffer, self.reader_workers = shuffle_buffer, reader_workers
        self.transform = transform or self._model_io
        self._lock = threading.Lock()
        self._stream, self._next = None, 0
        if self.num_batches == 0:
            raise batching.DatasetError(f"split '{split}' of {data_dir} has {self.source.num_examples} records: "
                                        f"not one batch of {batch_size}")

    def _model_io(self, batch: dict) -> tuple:
        return batching.model_inputs(batch, self.source.rho)

    @property
    def num_batches(self) -> int:
        return batching.num_batches(self.source.num_examples, self.batch_size, drop_remainder=self.training)

    def __len__(self) -> int:
        return self.num_batches

    def _open(self):
        if self.training:
            # One endless, seeded stream across epochs: no refill of the shuffle buffer at epoch ends.
            return batching.iter_batches(self.source, self.batch_size, shuffle=True, seed=self.seed, repeat=True,
                                         drop_remainder=True, workers=self.reader_workers,
                                         shuffle_buffer=self.shuffle_buffer)
        return batching.iter_batches(self.source, self.batch_size, workers=self.reader_workers)

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of {self.num_batches}")
        with self._lock:
            if self._stream is None or (not self.training and index < self._next):
                self._stream, self._next = self._open(), 0
            if not self.training:
                while self._next < index:  # skip forward (only when Keras asks out of order)
                    next(self._stream)
                    self._next += 1
            batch = next(self._stream)
            self._next += 1
        return self.transform(batch)

    def on_epoch_end(self):
        if not self.training:
            with self._lock:
                self._stream, self._next = None, 0

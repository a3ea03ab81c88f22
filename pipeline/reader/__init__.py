"""Reading the shards without TensorFlow: framing and decoding, the batching reader, Keras and PyTorch adapters."""

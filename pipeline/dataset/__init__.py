"""The dataset contract: pair geometry, the record schema and its Example codec, the dataset_info.json index."""

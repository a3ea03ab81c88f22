"""The dataset contract: pair geometry, the record schema and its Example codec, the project's index
(homography_index.json) and TFDS's metadata (dataset_info.json, features.json) written from it."""

"""The dataset contract: pair geometry, the record schema and its Example codec, the homography_index.json index."""

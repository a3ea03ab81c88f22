"""The build steps: COCO listing and decoding, the Beam transforms, the shard writer."""

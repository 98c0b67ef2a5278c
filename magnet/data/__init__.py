"""Streaming shard pipeline: manifest check, named stages from shard list to collated Batch, loaders."""

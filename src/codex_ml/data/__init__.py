"""Data: sources, cleaning, the train/validation split, packing into shards, and the resumable loader."""

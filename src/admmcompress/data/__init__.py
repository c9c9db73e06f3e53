"""Local dataset loaders and a checkpointable batch iterator."""

from admmcompress.data.datasets import BatchLoader, Split, find_dataset, load_dataset

__all__ = ["BatchLoader", "Split", "find_dataset", "load_dataset"]

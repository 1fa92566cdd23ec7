"""Data: image sources, the decode-once cache, the validation split and batch-wise augmentation."""

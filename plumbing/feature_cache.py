"""transfer.py's feature cache: .npy files keyed by the checkpoint file, the texts and the feature options.

A missing, damaged (truncated by a crash) or mismatched file is a miss, featurised again and overwritten;
the folder (default CHECKPOINT_DIR/features/) is safe to delete.
"""
import hashlib
import json
import os

import numpy as np


def cache_path(cache_dir, name, checkpoint, byte_strings, feature, dtype):
    """The file of split `name`'s features: keyed by the checkpoint's path, size and mtime, the texts' bytes,
    the feature and the dtype."""
    texts = hashlib.sha1()
    for b in byte_strings:
        texts.update(len(b).to_bytes(8, "little") + b)
    st = os.stat(checkpoint)
    key = json.dumps([os.path.abspath(checkpoint), st.st_size, st.st_mtime_ns, texts.hexdigest(), feature, dtype])
    return os.path.join(cache_dir, f"{name}-{feature}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")


def load(path, shape):
    """The array in `path` if it is there, readable and of `shape`; else None."""
    try:
        X = np.load(path)
    except (ValueError, OSError, EOFError):
        return None
    return X if X.shape == shape else None


def save(path, X):
    """Write X to `path` whole or not at all; returns X."""
    cache_dir = os.path.dirname(path)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            np.save(f, X)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise SystemExit(f"{cache_dir}: cannot write the feature cache ({e}); pass --cache-dir")
    return X

"""A generated image set written in CIFAR-10's real on-disk format, for machines without the real one.

`write_cifar10_format(root, ...)` writes `cifar-10-batches-py/` (five training batches, a test batch and
`batches.meta`, pickled exactly as the Toronto archive has them) and returns the MD5 of every file, and
`trust_files(md5s)` makes torchvision's `CIFAR10` accept them by replacing the MD5s it checks. The images are
helpers.make_synthetic's gratings (learnable, so training on them is a meaningful smoke test); the numbers
anything reports on them are NOT CIFAR-10 numbers, and the benchmark says so when it uses them."""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers  # noqa: E402

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def write_cifar10_format(root: str | Path, num_train: int = 50000, num_test: int = 10000, seed: int = 0) -> dict:
    """Write a CIFAR-10-format copy of a synthetic set under `root`; returns {file name: md5}."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = helpers.make_synthetic(num_train + num_test, seed=seed)  # uint8 (N, 3, 32, 32), (N,)
    rows = images.reshape(len(images), -1).numpy()  # (N, 3072): the red plane, then green, then blue
    labels = labels.tolist()
    splits = np.array_split(np.arange(num_train), len(TRAIN_FILES))
    batches = {name: idx for name, idx in zip(TRAIN_FILES, splits)}
    batches["test_batch"] = np.arange(num_train, num_train + num_test)
    md5s = {}
    for name, idx in batches.items():
        record = {"batch_label": name, "labels": [labels[i] for i in idx], "data": rows[idx],
                  "filenames": [f"{i}.png" for i in idx]}  # fmt: skip
        payload = pickle.dumps(record, protocol=2)
        helpers.atomic_write(folder / name, lambda tmp, payload=payload: tmp.write_bytes(payload))
        md5s[name] = hashlib.md5(payload).hexdigest()
    meta = pickle.dumps(
        {
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_vis": 3072,
        },
        protocol=2,
    )
    helpers.atomic_write(folder / "batches.meta", lambda tmp: tmp.write_bytes(meta))
    md5s["batches.meta"] = hashlib.md5(meta).hexdigest()
    return md5s


def trust_files(md5s: dict, setattr_=setattr) -> None:
    """Point torchvision's CIFAR10 checksum lists at the generated files (pass monkeypatch.setattr in tests)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10
    setattr_(cls, "train_list", [[name, md5s[name]] for name in TRAIN_FILES])
    setattr_(cls, "test_list", [["test_batch", md5s["test_batch"]]])
    setattr_(cls, "meta", {**cls.meta, "md5": md5s["batches.meta"]})

"""The lessons' datasets as uint8 tensors (N, 3, 32, 32): CIFAR-10/100, Fashion-MNIST and a synthetic set.

Plumbing, not a lesson: download and checksums (through torchvision), checks of the files on disk, Debian's
offline Fashion-MNIST, the generated grating images, and the one fallback rule (`load_data`). `helpers`
re-exports `ImageData`, `load_data`, `load_dataset` and `make_synthetic`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lesson_config import Config, UserError, error_summary, require

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


class DataUnavailableError(UserError):
    """The dataset is neither on disk nor downloadable."""


@dataclass
class ImageData:
    """A dataset held as uint8 image tensors of shape (N, 3, 32, 32) and int64 labels.

    `val` is held out of the training set (it chooses things: checkpoints, settings); `test` is the official
    test set, only ever reported. Fashion-MNIST's 28x28 grey images are zero-padded to 32x32 and repeated over
    three channels so that every CIFAR model runs on them unchanged."""

    name: str
    classes: tuple[str, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, float, float]  # per-channel mean of the training images, in [0, 1]
    std: tuple[float, float, float]  # per-channel standard deviation of the training images

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device) -> ImageData:
        """Move every tensor to `device` (the whole dataset: CIFAR-10 is 150 MB as uint8)."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return ImageData(**moved)


def _download_hint(name: str, data_dir: Path) -> str:
    if name == "fashion-mnist":
        return (
            f"connect to the internet once, or on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` "
            f"(the lessons then read {DEBIAN_FASHION_MNIST} offline), or use --dataset synthetic"
        )
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
    return (
        f"connect to the internet once, or copy {archive} from https://www.cs.toronto.edu/~kriz/ into {data_dir}/, "
        f"or use --dataset fashion-mnist (offline on Debian: apt-get install dataset-fashion-mnist) or --dataset synthetic"
    )


def _torchvision_cifar(name: str, data_dir: Path, download: bool):
    """(train_x, train_y, test_x, test_y, classes) through torchvision, which verifies the MD5 of every file."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sets = []
    for train in (True, False):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # torchvision prints "Files already downloaded"
                ds = cls(root=str(data_dir), train=train, download=download)
        except (RuntimeError, OSError, ValueError) as error:  # not found / corrupted / no network
            folder = data_dir / cls.base_folder
            require(
                not folder.exists(),
                f"{name} files in {folder} are corrupt or incomplete: torchvision says {error_summary(error)!r} "
                f"(delete {folder} and its archive to unpack or download them again)",
            )
            raise DataUnavailableError(
                f"{name} is not in {data_dir} and could not be downloaded: {error_summary(error)} ({_download_hint(name, data_dir)})"
            ) from None
        x = (
            torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        )  # (N, H, W, C) -> (N, C, H, W)
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        require(
            x.shape[1:] == (3, 32, 32) and len(x) == len(y) and len(y) > 0,
            f"{name} files in {data_dir / cls.base_folder} are corrupt: images of shape {tuple(x.shape)} for "
            f"{len(y)} labels (delete the folder and its archive to download them again)",
        )
        require(
            int(y.min()) >= 0 and int(y.max()) < len(ds.classes),
            f"{name} files in {data_dir / cls.base_folder} are corrupt: labels outside 0..{len(ds.classes) - 1} "
            f"(delete the folder and its archive to download them again)",
        )
        sets += [x, y]
    return (*sets, tuple(ds.classes))


# MD5 of the four uncompressed Fashion-MNIST files. Debian recompresses the .gz archives (so their MD5s differ
# from the ones torchvision checks), but the uncompressed bytes are Zalando's originals.
FASHION_MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


IDX_MAGIC = {1: 2049, 3: 2051}  # the IDX format's magic number: 0x0000 0x08 (unsigned bytes) 0x0D (dimensions)


def _idx_shape(path: Path, dims: int) -> tuple[int, ...]:
    """The shape an (uncompressed, unsigned-byte) IDX file declares, after checking its magic number and size."""
    with path.open("rb") as f:
        header = f.read(4 + 4 * dims)
    corrupt = f"{path} is corrupt"
    hint = f"(delete {path.parent} to unpack or download the files again)"
    require(len(header) == 4 + 4 * dims, f"{corrupt}: it is only {len(header)} bytes long {hint}")
    magic = int.from_bytes(header[:4], "big")
    require(magic == IDX_MAGIC[dims], f"{corrupt}: wrong magic number {magic} (expected {IDX_MAGIC[dims]}) {hint}")
    shape = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    size = path.stat().st_size - len(header)
    require(size == math.prod(shape), f"{corrupt}: it declares {shape} bytes of data but holds {size} {hint}")
    return shape


def verify_idx_files(raw_dir: Path, num_classes: int) -> None:
    """Check the four MNIST-style files in `raw_dir` before torchvision reads them: magic numbers, sizes, one
    label per image and every label a class index (torchvision checks none of this for local files)."""
    if not all((raw_dir / name).is_file() for name in FASHION_MNIST_RAW_MD5):
        return  # absent: torchvision downloads them, or reports them missing
    for split in ("train", "t10k"):
        images, labels = raw_dir / f"{split}-images-idx3-ubyte", raw_dir / f"{split}-labels-idx1-ubyte"
        count, height, width = _idx_shape(images, 3)
        require((height, width) == (28, 28), f"{images} is corrupt: images of {height}x{width} pixels, not 28x28")
        (num_labels,) = _idx_shape(labels, 1)
        require(num_labels == count, f"{labels} is corrupt: {num_labels} labels for {count} images in {images.name}")
        values = np.frombuffer(labels.read_bytes()[8:], dtype=np.uint8)
        require(
            values.size == 0 or int(values.max()) < num_classes,
            f"{labels} is corrupt: label {int(values.max()) if values.size else 0} is outside 0..{num_classes - 1} "
            f"(delete {raw_dir} to unpack or download the files again)",
        )


def _install_debian_fashion_mnist(raw_dir: Path, source: Path) -> bool:
    """Unpack the Fashion-MNIST files that Debian's `dataset-fashion-mnist` ships into torchvision's raw
    folder, checking each against its known MD5. Returns False when the package is not installed."""
    import helpers  # here, not at the top: helpers imports this module

    if not all((source / f"{name}.gz").exists() for name in FASHION_MNIST_RAW_MD5):
        return False
    for name, md5 in FASHION_MNIST_RAW_MD5.items():
        data = gzip.decompress((source / f"{name}.gz").read_bytes())
        require(
            hashlib.md5(data).hexdigest() == md5,
            f"{source / name}.gz does not match its known MD5 checksum (reinstall dataset-fashion-mnist)",
        )
        helpers.atomic_write(raw_dir / name, lambda tmp, data=data: tmp.write_bytes(data))
    return True


def _torchvision_fashion_mnist(data_dir: Path, download: bool, debian_dir: Path = DEBIAN_FASHION_MNIST):
    import torchvision

    cls = torchvision.datasets.FashionMNIST
    raw_dir = data_dir / cls.__name__ / "raw"
    if not all((raw_dir / name).exists() for name in FASHION_MNIST_RAW_MD5):
        _install_debian_fashion_mnist(raw_dir, debian_dir)
    verify_idx_files(raw_dir, len(FASHION_CLASSES))
    sets = []
    for train in (True, False):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                ds = cls(root=str(data_dir), train=train, download=download)
        except (RuntimeError, OSError, ValueError) as error:
            raise DataUnavailableError(
                f"fashion-mnist is not in {data_dir} and could not be downloaded: {error_summary(error)} ({_download_hint('fashion-mnist', data_dir)})"
            ) from None
        x = F.pad(ds.data, (2, 2, 2, 2))  # (N, 28, 28) -> (N, 32, 32), zero border like LeNet's input
        x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 32, 32) -> (N, 3, 32, 32)
        sets += [x, ds.targets.to(torch.int64)]
    return (*sets, FASHION_CLASSES)


SYNTHETIC_TILTS = 5  # tilt classes: 0, 22.5, 45, 67.5 and 90 degrees between the stripes and the vertical
SYNTHETIC_BANDS = ((0.25, 0.40), (0.55, 0.80))  # spatial-frequency bands in radians per pixel: coarse, fine
SYNTHETIC_CLASSES = tuple(
    f"{band}-{tilt * 90 / (SYNTHETIC_TILTS - 1):g}deg" for band in ("coarse", "fine") for tilt in range(SYNTHETIC_TILTS)
)


def synthetic_label(theta: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """The class of a grating with normal at angle `theta` (radians) and frequency `freq` (radians/pixel).

    The class reads the tilt, min(theta, pi - theta) after folding theta into [0, pi), not the orientation
    itself: mirroring an image left-right turns theta into pi - theta, so a class must contain both, or a
    horizontal flip (augmentation, flip TTA) would change what the label means."""
    folded = torch.remainder(theta, math.pi)
    tilt = torch.minimum(folded, math.pi - folded)  # in [0, pi/2], the same for an image and its mirror
    tilt_class = torch.round(tilt / (math.pi / 2) * (SYNTHETIC_TILTS - 1)).long()
    band = (freq > (SYNTHETIC_BANDS[0][1] + SYNTHETIC_BANDS[1][0]) / 2).long()
    return band * SYNTHETIC_TILTS + tilt_class


def render_gratings(params: dict[str, torch.Tensor], size: int = 32) -> torch.Tensor:
    """Float images (N, 3, H, W) in [0, 1] from grating parameters (see `make_synthetic`), before pixel noise."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2  # symmetric: x -> -x is a mirror
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W) each
    theta, freq = params["theta"][:, None, None], params["freq"][:, None, None]
    along = xx[None] * torch.cos(theta) + yy[None] * torch.sin(theta)  # (N, H, W): position along the normal
    grating = torch.sin(along * freq + params["phase"][:, None, None])  # (N, H, W) in [-1, 1]
    shade = params["contrast"][:, None, None, None] * params["colour"][:, :, None, None]  # (N, 3, 1, 1)
    image = 0.5 + 0.5 * shade * grating[:, None]  # (N, 3, H, W)
    centre = params["blob_centre"]  # (N, 2): x, y of a dark occluding disc
    dist = (xx[None] - centre[:, 0, None, None]) ** 2 + (yy[None] - centre[:, 1, None, None]) ** 2
    return image * (dist >= params["blob_radius"][:, None, None] ** 2)[:, None]


def synthetic_parameters(num_images: int, generator: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """Random grating parameters: a tilt class and a frequency band (together the label), each jittered,
    the tilt's sign drawn at random (so both an orientation and its mirror image occur in every class),
    and a random phase, contrast, colour and occluding blob."""
    g = generator
    tilt_class = torch.randint(0, SYNTHETIC_TILTS, (num_images,), generator=g)
    band = torch.randint(0, len(SYNTHETIC_BANDS), (num_images,), generator=g)
    gap = (math.pi / 2) / (SYNTHETIC_TILTS - 1)
    jitter = (torch.rand(num_images, generator=g) - 0.5) * (2 / 3) * gap  # up to a third of the gap
    tilt = (tilt_class.float() * gap + jitter).abs()  # |.|: a jittered 0-degree tilt stays near 0
    tilt = torch.minimum(tilt, math.pi - tilt)
    mirrored = torch.rand(num_images, generator=g) < 0.5
    low = torch.tensor([b[0] for b in SYNTHETIC_BANDS])[band]
    high = torch.tensor([b[1] for b in SYNTHETIC_BANDS])[band]
    return {
        "theta": torch.where(mirrored, math.pi - tilt, tilt),
        "freq": low + (high - low) * torch.rand(num_images, generator=g),
        "phase": 2 * math.pi * torch.rand(num_images, generator=g),
        "contrast": 0.3 + 0.7 * torch.rand(num_images, generator=g),
        "colour": 0.3 + 0.7 * torch.rand(num_images, 3, generator=g),
        "blob_centre": (torch.rand(num_images, 2, generator=g) - 0.5) * size,
        "blob_radius": 3 + 6 * torch.rand(num_images, generator=g),
    }


def make_synthetic(num_images: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A procedurally generated image set that needs no download: learnable, but not trivially.

    Each image is a sinusoidal grating; its class (10 of them, `SYNTHETIC_CLASSES`) is its tilt from the
    vertical (5 steps of 22.5 degrees, jittered by up to 7.5) and its stripe frequency (coarse or fine).
    Phase, colour, contrast, a dark occluding blob and pixel noise vary freely. Every augmentation the
    lessons apply keeps the class: crops and cutout move or hide stripes without turning them, and a
    horizontal flip maps a tilt onto itself (see `synthetic_label`)."""
    g = torch.Generator().manual_seed(seed)
    params = synthetic_parameters(num_images, g, size)
    image = render_gratings(params, size) + 0.15 * torch.randn(num_images, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), synthetic_label(params["theta"], params["freq"])


def check_data_dir(data_dir: str | Path) -> None:
    """Cheap checks of `--data-dir` that a lesson can run before any long work: it is a folder (or absent), and
    the Fashion-MNIST files in it, if any, are intact. (CIFAR's files are checked by MD5 when loaded.)"""
    data_dir = Path(data_dir)
    require(
        not data_dir.exists() or data_dir.is_dir(),
        f"--data-dir {data_dir} is a file, not a folder (pass the folder that holds or will hold the datasets)",
    )
    verify_idx_files(data_dir / "FashionMNIST" / "raw", len(FASHION_CLASSES))


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    val_size: int = 5000,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    download: bool = True,
    fallback: bool = False,
    synthetic_size: int = 12000,
) -> ImageData:
    """Load a dataset as `ImageData`, holding `val_size` training images out for validation.

    `train_size` / `test_size` keep a seeded random subset (None keeps all). With `fallback=True` a dataset
    that cannot be had is replaced by Fashion-MNIST (when on disk) or the synthetic set, with a loud notice
    on stderr. Lessons call `load_data`, which decides `fallback` by the one rule."""
    require(name in DATASETS, f"unknown dataset {name!r} (use one of: {', '.join(DATASETS)})")
    data_dir = Path(data_dir)
    if name != "synthetic":
        check_data_dir(data_dir)
    try:
        if name == "synthetic":
            x, y = make_synthetic(synthetic_size + max(synthetic_size // 6, 1000), seed=12345)
            split = synthetic_size
            train_x, train_y, test_x, test_y = x[:split], y[:split], x[split:], y[split:]
            classes = SYNTHETIC_CLASSES
        elif name == "fashion-mnist":
            train_x, train_y, test_x, test_y, classes = _torchvision_fashion_mnist(data_dir, download)
        else:
            train_x, train_y, test_x, test_y, classes = _torchvision_cifar(name, data_dir, download)
    except DataUnavailableError as error:
        if not fallback:
            raise
        # Real data beats generated data: prefer Fashion-MNIST when it is already on this machine.
        substitute = "synthetic"
        if name != "fashion-mnist":
            with contextlib.suppress(DataUnavailableError):
                _torchvision_fashion_mnist(data_dir, download=False)
                substitute = "fashion-mnist"
        banner = "!" * 100
        print(
            f"\n{banner}\nNOTICE: {error}\nFalling back to the {substitute.upper()} dataset so that this quick run still works: "
            f"its numbers are\nnot {name} numbers. A --full run never falls back: it stops with the error above.\n{banner}\n",
            file=sys.stderr,
            flush=True,
        )
        return load_dataset(substitute, data_dir, val_size, train_size, test_size, seed, download=False)

    require(0 < val_size < len(train_x), f"--val-size must be between 1 and {len(train_x) - 1} for {name}")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_size is not None:
        require(train_size > 0, "--train-size must be positive")
        train_idx = train_idx[:train_size]
    if test_size is not None:
        test_idx = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed + 1))[:test_size]
        test_x, test_y = test_x[test_idx], test_y[test_idx]
    val_x, val_y = train_x[val_idx], train_y[val_idx]
    train_x, train_y = train_x[train_idx], train_y[train_idx]
    scaled = train_x.float().div_(255)
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    std = tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageData(name, classes, train_x, train_y, val_x, val_y, test_x, test_y, mean, std)


def load_data(cfg: Config, test_size: int | None = None, fallback: bool = True) -> ImageData:
    """The one way a lesson gets its data: `cfg.dataset` with the lesson's data_dir, val_size, train_size
    (0 or absent: all), seed and download, keeping `test_size` test images (None: all).

    The fallback rule, the only one: when the dataset is not available (not on disk, no download), a quick
    run substitutes another one with a loud notice, whether the name came from the constants block, a
    keyword or a flag; a `--full` run (or a caller passing `fallback=False`, such as a resumed run) stops with
    an error that says how to get the data."""
    return load_dataset(
        cfg.dataset,
        cfg.data_dir,
        val_size=cfg.val_size,
        train_size=cfg.get("train_size") or None,
        test_size=test_size,
        seed=cfg.seed,
        download=cfg.download,
        fallback=fallback and not cfg.get("full", False),
    )

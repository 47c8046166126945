"""LightningDataModules for ScalableVQ training.

Three data modules, all light on dependencies (PIL and numpy only, no torchvision):

* :class:`SampleImagesDataModule` -- the default: scikit-learn's two sample images
  (``china.jpg``, ``flower.jpg``) that ship with the package, so ``python train.py``
  works offline.
* :class:`ImageFolderDataModule` -- a user's own images from a folder.
* :class:`VectorDataModule` -- plain ``[N, D]`` vectors from a ``.npy`` / ``.npz`` /
  ``.pt`` file (the seed's use case, e.g. attributes of 3-D points).

Image data modules hold every image in memory as ``uint8`` and cut crops on the fly:
random crops (with optional horizontal flips and colour-channel shuffles) for training,
a fixed grid of crops for validation. Validation comes from a held-out region of every
image (its rightmost
``val_fraction`` of columns) unless the folder has ``train/`` and ``val/`` sub-folders,
so the validation figures are measured on pixels the model never trained on.
``val_fraction=1.0`` turns whole images into validation data (useful for ``eval.py``).
Under ``Trainer(overfit_batches=...)`` the training crops are the same every epoch.

Settings are checked when a data module is built or set up: a bad one raises a
one-line ``ValueError`` that starts with the setting's name and value
(``crop_size=0 ...``, ``root=/x is not a folder ...``), which ``train.py`` prints as
``data.<setting>``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..arrays import load_array
from ..validation import check_int

__all__ = [
    "IMAGE_EXTENSIONS",
    "RandomCropDataset",
    "FixedCropDataset",
    "ImageCropDataModule",
    "SampleImagesDataModule",
    "ImageFolderDataModule",
    "VectorDataModule",
    "load_vectors",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _to_chw_uint8(array: np.ndarray) -> torch.Tensor:
    """HxWx3 (or HxW) uint8 array -> 3xHxW uint8 tensor."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image array of shape [H, W, 3], got {array.shape}")
    array = array[:, :, :3]
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} is not allowed: true or false")
    return bool(value)


def _to_float(img: torch.Tensor) -> torch.Tensor:
    return img.to(torch.float32).div_(255.0)


def _current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    for key in ("RANK", "GLOBAL_RANK", "LOCAL_RANK"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


def _largest_square(images: Sequence[torch.Tensor]) -> int:
    return max((min(img.shape[1], img.shape[2]) for img in images), default=0)


def _sizes(images: Sequence[torch.Tensor]) -> str:
    sizes = sorted({f"{img.shape[2]}x{img.shape[1]}" for img in images})
    return ", ".join(sizes[:6]) + (", ..." if len(sizes) > 6 else "")


class RandomCropDataset(Dataset):
    """``length`` random ``crop_size`` crops (float in [0, 1], [3, s, s]) of in-memory images.

    Crop positions come from a numpy generator seeded by ``(seed, rank, worker id)``:
    reproducible for a given run, different on every DDP rank and dataloader worker.
    Images are drawn in proportion to their number of possible crop positions. With
    ``fixed=True`` crop ``i`` depends on ``(seed, i)`` only: the same crops every epoch
    (for overfitting checks).
    """

    def __init__(self, images: Sequence[torch.Tensor], crop_size: int, length: int, *, hflip: bool = True,
                 channel_shuffle: bool = False, seed: int = 0, fixed: bool = False):
        crop_size = check_int(crop_size, "crop_size", min=1)
        self.images = [img for img in images if img.shape[1] >= crop_size and img.shape[2] >= crop_size]
        if not self.images:
            raise ValueError(f"crop_size={crop_size} is larger than every training image (width x height: "
                             f"{_sizes(images)}); allowed: at most {_largest_square(images)}")
        self.crop_size = crop_size
        self.length = check_int(length, "train_crops_per_epoch", min=1)
        self.hflip = bool(hflip)
        self.channel_shuffle = bool(channel_shuffle)
        self.seed = int(seed)
        self.fixed = bool(fixed)
        positions = np.array([(img.shape[1] - crop_size + 1) * (img.shape[2] - crop_size + 1) for img in self.images],
                             dtype=np.float64)
        self.image_weights = positions / positions.sum()
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.length

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        key = (_current_rank(), info.id if info is not None else -1)
        if self._rng is None or self._rng_key != key:
            self._rng = np.random.default_rng([self.seed, key[0], key[1] + 1])
            self._rng_key = key
        return self._rng

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, int(index)]) if self.fixed else self._generator()
        img = self.images[int(rng.choice(len(self.images), p=self.image_weights))]
        s = self.crop_size
        top = int(rng.integers(0, img.shape[1] - s + 1))
        left = int(rng.integers(0, img.shape[2] - s + 1))
        crop = img[:, top:top + s, left:left + s]
        if self.hflip and rng.random() < 0.5:
            crop = crop.flip(-1)
        if self.channel_shuffle and rng.random() < 0.5:
            crop = crop[torch.from_numpy(rng.permutation(crop.shape[0]))]
        return _to_float(crop)


class FixedCropDataset(Dataset):
    """A deterministic grid of non-overlapping ``crop_size`` crops of every image.

    At most ``max_crops`` crops in all, picked evenly over the grid.
    """

    def __init__(self, images: Sequence[torch.Tensor], crop_size: int, max_crops: int | None = None):
        crop_size = self.crop_size = check_int(crop_size, "val_crop_size", min=1)
        boxes: list[tuple[int, int, int]] = []
        for i, img in enumerate(images):
            rows, cols = img.shape[1] // crop_size, img.shape[2] // crop_size
            # centre the grid in the image
            top0 = (img.shape[1] - rows * crop_size) // 2
            left0 = (img.shape[2] - cols * crop_size) // 2
            for r in range(rows):
                for c in range(cols):
                    boxes.append((i, top0 + r * crop_size, left0 + c * crop_size))
        if not boxes:
            raise ValueError(f"val_crop_size={crop_size} is larger than every validation region (width x height: "
                             f"{_sizes(images)}); allowed: at most {_largest_square(images)} (or raise val_fraction)")
        if max_crops is not None and len(boxes) > max_crops:
            pick = np.linspace(0, len(boxes) - 1, int(max_crops)).round().astype(int)
            boxes = [boxes[j] for j in pick]
        self.images = list(images)
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> torch.Tensor:
        i, top, left = self.boxes[index]
        s = self.crop_size
        return _to_float(self.images[i][:, top:top + s, left:left + s])


def _split_columns(img: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Left part of the image for training, the rightmost ``val_fraction`` of its columns for validation."""
    width = img.shape[2]
    n_val = int(round(width * val_fraction))
    n_val = min(max(n_val, 0), width)
    train = img[:, :, : width - n_val] if n_val < width else None
    val = img[:, :, width - n_val:] if n_val > 0 else None
    return train, val


class _LoadersMixin:
    """Train / val / test loaders shared by the data modules of this file.

    Needs ``data_train``, ``data_val``, ``batch_size``, ``val_batch_size``,
    ``num_workers``; ``drop_last_train`` drops a ragged last training batch.
    """

    drop_last_train: bool = False

    def _loader(self, dataset: Dataset | None, stage: str, batch_size: int, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for its data loader")
        shuffle = train and not getattr(dataset, "fixed", False)  # fixed crops: the same batches every epoch
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=train and self.drop_last_train,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, "fit", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, "validate", self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ImageCropDataModule(_LoadersMixin, L.LightningDataModule):
    """Base class: images in memory, random training crops, fixed validation crops.

    Subclasses implement :meth:`load_images` (returns ``(train_images, val_images)``;
    ``val_images=None`` means "split every image by columns").

    Args:
        crop_size: side of the square training crops (must be a multiple of the
            autoencoder's downsampling factor).
        val_crop_size: side of the square validation crops.
        train_crops_per_epoch: number of random crops that make one training epoch.
        batch_size / val_batch_size: loader batch sizes.
        val_fraction: fraction of every image's columns (on the right) held out for
            validation when there is no separate validation set. 1.0 = whole images.
        max_val_crops: cap on the number of validation crops (evenly picked).
        hflip: random horizontal flips of the training crops.
        channel_shuffle: half of the training crops get a random order of their colour
            channels (one in six of those the identity): more colours than a few photos hold (the default run's
            model, trained on two photos, gains about 2 dB at full depth on
            held-out photos at a lower rate: ``bench/bench_codec.py``).
        num_workers: dataloader workers (0 = load in the main process; crops are cheap).
        seed: seed of the training-crop generator.
    """

    drop_last_train = True

    kind = "images"

    def __init__(self, crop_size: int = 64, val_crop_size: int = 128, train_crops_per_epoch: int = 512,
                 batch_size: int = 16, val_batch_size: int = 8, val_fraction: float = 0.2,
                 max_val_crops: int | None = None, hflip: bool = True, channel_shuffle: bool = False,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction <= 1:
            raise ValueError(f"val_fraction={val_fraction!r} is not allowed: a number in [0, 1]")
        self.crop_size = check_int(crop_size, "crop_size", min=1)
        self.val_crop_size = check_int(val_crop_size, "val_crop_size", min=1)
        self.train_crops_per_epoch = check_int(train_crops_per_epoch, "train_crops_per_epoch", min=1)
        self.batch_size = check_int(batch_size, "batch_size", min=1)
        self.val_batch_size = check_int(val_batch_size, "val_batch_size", min=1)
        self.val_fraction = float(val_fraction)
        self.max_val_crops = None if max_val_crops is None else check_int(max_val_crops, "max_val_crops", min=1)
        self.hflip = _check_bool(hflip, "hflip")
        self.channel_shuffle = _check_bool(channel_shuffle, "channel_shuffle")
        self.num_workers = check_int(num_workers, "num_workers", min=0)
        self.seed = check_int(seed, "seed")
        self.train_images: list[torch.Tensor] | None = None
        self.val_images: list[torch.Tensor] | None = None
        self.data_train: RandomCropDataset | None = None
        self.data_val: FixedCropDataset | None = None

    # -- to implement -------------------------------------------------------------------
    def load_images(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        raise NotImplementedError

    # -- properties the training script and callbacks use --------------------------------
    @property
    def channels(self) -> int:
        return 3

    @property
    def data_range(self) -> float:
        return 1.0

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is None:
            images, val_images = self.load_images()
            if val_images is None:
                train_images, val_images = [], []
                for img in images:
                    tr, va = _split_columns(img, self.val_fraction)
                    if tr is not None:
                        train_images.append(tr)
                    if va is not None:
                        val_images.append(va)
            else:
                train_images = images
            self.train_images, self.val_images = train_images, val_images
        if stage in (None, "fit") and self.data_train is None:
            if not self.train_images:
                raise ValueError(f"val_fraction={self.val_fraction} leaves no pixels to train on; allowed for "
                                 f"training: below 1 (e.g. 0.2)")
            self.data_train = RandomCropDataset(self.train_images, self.crop_size, self.train_crops_per_epoch,
                                                hflip=self.hflip, channel_shuffle=self.channel_shuffle,
                                                seed=self.seed)
        if stage in (None, "fit", "validate", "test") and self.data_val is None:
            if not self.val_images:
                raise ValueError(f"val_fraction={self.val_fraction} leaves no pixels to validate on; allowed: "
                                 f"above 0 (e.g. 0.2)")
            self.data_val = FixedCropDataset(self.val_images, self.val_crop_size, self.max_val_crops)

    def train_dataloader(self) -> DataLoader:
        # Trainer(overfit_batches=...): the same crops every epoch, or there is nothing to overfit
        if self.data_train is not None:
            trainer = self.trainer
            self.data_train.fixed = bool(trainer is not None and trainer.overfit_batches)
        return super().train_dataloader()


class SampleImagesDataModule(ImageCropDataModule):
    """scikit-learn's embedded sample images (``china.jpg``, ``flower.jpg``, 427x640 RGB each).

    No download: the JPEGs ship inside scikit-learn. Training crops come from the left
    ``1 - val_fraction`` of each image, validation crops from the held-out right part.
    """

    def __init__(self, names: Sequence[str] = ("china.jpg", "flower.jpg"), **kwargs):
        super().__init__(**kwargs)
        names = [names] if isinstance(names, str) else list(names)
        allowed = _sample_image_names()
        if not names or any(str(n) not in allowed for n in names):
            raise ValueError(f"names={names} is not allowed: a non-empty list of scikit-learn's sample images "
                             f"{allowed}")
        self.names = [str(n) for n in names]
        self.save_hyperparameters()

    def load_images(self) -> tuple[list[torch.Tensor], None]:
        from sklearn.datasets import load_sample_image

        return [_to_chw_uint8(load_sample_image(name)) for name in self.names], None


def _sample_image_names() -> list[str]:
    import sklearn.datasets

    return sorted(p.name for p in (Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path, max_side: int | None) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not an image PIL can read ({type(e).__name__})") from None
    with im:
        im = im.convert("RGB")
        if max_side is not None and max(im.size) > max_side:
            scale = max_side / max(im.size)
            new = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            im = im.resize(new, Image.Resampling.LANCZOS)
        return _to_chw_uint8(np.asarray(im))


class ImageFolderDataModule(ImageCropDataModule):
    """A user's images from ``root`` (PNG/JPEG/... read with PIL, held in memory as uint8).

    If ``root`` has ``train/`` and ``val/`` sub-folders they are used as the two splits;
    otherwise every image is split by columns (see :class:`ImageCropDataModule`).

    Args:
        root: folder of images.
        recursive: also look into sub-folders.
        max_side: downscale images whose longer side exceeds this (None = keep size).
        **kwargs: see :class:`ImageCropDataModule`.
    """

    def __init__(self, root: str, recursive: bool = True, max_side: int | None = 1024, **kwargs):
        super().__init__(**kwargs)
        if root is None or str(root) in ("", "???"):
            raise ValueError(f"root={root!r} is not allowed: a folder of images ({', '.join(IMAGE_EXTENSIONS)})")
        self.root = Path(str(root)).expanduser()
        self.recursive = _check_bool(recursive, "recursive")
        self.max_side = None if max_side is None else check_int(max_side, "max_side", min=1)
        self.save_hyperparameters()

    def load_images(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        allowed = f"allowed: a folder of images ({', '.join(IMAGE_EXTENSIONS)})"
        if not self.root.is_dir():
            raise ValueError(f"root={self.root} is not a folder; {allowed}")
        train_dir, val_dir = self.root / "train", self.root / "val"
        if train_dir.is_dir() and val_dir.is_dir():
            train = [_read_image(p, self.max_side) for p in _list_images(train_dir, self.recursive)]
            val = [_read_image(p, self.max_side) for p in _list_images(val_dir, self.recursive)]
            if not train or not val:
                raise ValueError(f"root={self.root}: its train/ and val/ sub-folders must both hold images; {allowed}")
            return train, val
        paths = _list_images(self.root, self.recursive)
        if not paths:
            raise ValueError(f"root={self.root} holds no images; {allowed}")
        return [_read_image(p, self.max_side) for p in paths], None


# ----------------------------------------------------------------------------------------
# vectors
# ----------------------------------------------------------------------------------------

def load_vectors(path: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """An ``[N, D]`` float tensor from ``.npy``, ``.npz`` or ``.pt`` (read by :func:`svq_modules.arrays.load_array`).

    ``key`` picks an entry of an ``.npz`` archive or of a dict saved with ``torch.save``
    (default: the only / first entry). Returns float32 (float64 stays float64).
    Raises ``FileNotFoundError`` / ``ValueError`` as ``load_array`` does, and
    ``ValueError`` for arrays that are not 2-D.
    """
    x = torch.from_numpy(np.array(load_array(path, key)))
    if x.ndim != 2:
        raise ValueError(f"{path}: expected an [N, D] array, got shape {list(x.shape)}")
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


class _Vectors(Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.x[index]


_VECTOR_FILES = "a .npy, .npz or .pt file holding an [N, D] array (data.key names an .npz / dict entry)"


class VectorDataModule(_LoadersMixin, L.LightningDataModule):
    """Plain ``[N, D]`` vectors from a file, split at random (fixed seed) into train / val.

    Args:
        path: ``.npy``, ``.npz`` or ``.pt`` file holding an ``[N, D]`` array.
        key: entry name inside an ``.npz`` / dict ``.pt`` file.
        val_fraction: share of vectors held out for validation (at least one vector).
        batch_size / val_batch_size: loader batch sizes.
        dtype: ``float32`` (default) or ``float64``.
        num_workers: dataloader workers.
        seed: seed of the train/val split.
    """

    kind = "vectors"

    def __init__(self, path: str, key: str | None = None, val_fraction: float = 0.1, batch_size: int = 1024,
                 val_batch_size: int = 4096, dtype: str = "float32", num_workers: int = 0, seed: int = 0):
        super().__init__()
        if path is None or str(path) in ("", "???"):
            raise ValueError(f"path={path!r} is not allowed: {_VECTOR_FILES}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r} is not allowed: a number in (0, 1)")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={dtype!r} is not allowed: float32 or float64")
        self.path = str(path)
        self.key = key
        self.val_fraction = float(val_fraction)
        self.batch_size = check_int(batch_size, "batch_size", min=1)
        self.val_batch_size = check_int(val_batch_size, "val_batch_size", min=1)
        self.dtype = getattr(torch, dtype)
        self.num_workers = check_int(num_workers, "num_workers", min=0)
        self.seed = check_int(seed, "seed")
        self.save_hyperparameters()
        self.vectors: torch.Tensor | None = None
        self.data_train: _Vectors | None = None
        self.data_val: _Vectors | None = None

    def _load(self) -> torch.Tensor:
        if self.vectors is None:
            try:
                x = load_vectors(self.path, self.key)
            except (OSError, ValueError) as e:
                msg = str(e)
                for head in (f"{Path(self.path).expanduser()}: ", f"{self.path}: "):
                    msg = msg[len(head):] if msg.startswith(head) else msg
                raise ValueError(f"path={self.path}: {msg}; allowed: {_VECTOR_FILES}") from None
            self.vectors = x.to(self.dtype)
        return self.vectors

    @property
    def dim(self) -> int:
        return int(self._load().shape[1])

    @property
    def data_range(self) -> float:
        x = self._load()
        return float(x.max() - x.min())

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        x = self._load()
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"path={self.path} holds {n} vector(s); allowed: at least 2 (for a train/val split)")
        n_val = min(max(1, int(math.floor(n * self.val_fraction))), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        self.data_val = _Vectors(x[perm[:n_val]])
        self.data_train = _Vectors(x[perm[n_val:]])


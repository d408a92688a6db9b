"""GPU decode path (`decoder="cuda"`): nvJPEG decode, random-resized-crop and flip on the device.

Data-loader workers only read the file bytes and draw the crop box and flip from the JPEG header
(with the per-sample seed, the same draws as the PIL path); the main process decodes the whole batch
with `torchvision.io.decode_jpeg(device=...)` and crops, resizes, flips and normalises there. Files
the device decoder cannot take (non-JPEG, CMYK, truncated ones still readable by PIL) are decoded by
the worker on the CPU. On a CPU device the same code runs with libjpeg, which is how it is tested.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as tv_transforms
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as F

from polyscale.data.decode import Normalize255, center_crop_box, interpolation_mode, resized_size, to_rgb
from polyscale.errors import DataError

__all__ = [
    "EncodedBatchDecoder",
    "EncodedSample",
    "EncodedTrainLoad",
    "EncodedValLoad",
    "collate_encoded",
    "placeholder_encoded",
]


class EncodedSample(NamedTuple):
    data: Tensor  # uint8: 1-D encoded JPEG, or (3, H, W) RGB already decoded by the worker
    params: Tensor  # int64 (6,): resize_h, resize_w (0: no resize), crop top, left, height, width
    flip: bool


def _payload(path: str, img: Image.Image) -> Tensor:
    """Encoded bytes when the device decoder can take them, else the image decoded here."""
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        data = read_file(path)  # (n,) uint8
        if data.numel() > 4 and data[-2] == 0xFF and data[-1] == 0xD9:  # intact end-of-image marker
            return data
    return F.pil_to_tensor(to_rgb(img))  # (3, H, W); raises for an undecodable file -> bad file


class EncodedTrainLoad:
    """Path -> EncodedSample with a RandomResizedCrop box and a flip decision."""

    def __init__(self, scale: Sequence[float], ratio: Sequence[float], hflip: bool) -> None:
        self.scale, self.ratio, self.hflip = list(scale), list(ratio), hflip

    def __call__(self, path: str) -> EncodedSample:
        with Image.open(path) as img:
            top, left, h, w = tv_transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
            flip = self.hflip and bool(torch.rand(1) < 0.5)  # as v2.RandomHorizontalFlip draws it
            data = _payload(path, img)
        return EncodedSample(data, torch.tensor([0, 0, top, left, h, w]), flip)


class EncodedValLoad:
    """Path -> EncodedSample resized (shorter side `resize`) and center-cropped (`crop`) on the device."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize, self.crop = resize, crop

    def __call__(self, path: str) -> EncodedSample:
        with Image.open(path) as img:
            width, height = img.size
            new_h, new_w = resized_size(height, width, self.resize)
            top, left = center_crop_box(new_h, new_w, self.crop)
            data = _payload(path, img)
        return EncodedSample(data, torch.tensor([new_h, new_w, top, left, self.crop, self.crop]), False)


def placeholder_encoded(size: int) -> EncodedSample:
    """A black image standing in for a bad file in evaluation (its target is -1)."""
    return EncodedSample(
        torch.zeros(3, size, size, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, size, size]), False
    )


def collate_encoded(
    items: list[tuple[EncodedSample, int, int]],
) -> tuple[list[EncodedSample], Tensor, Tensor]:
    """(sample, target, file index) items -> (samples, targets (B,), file indices (B,))."""
    samples, targets, indices = zip(*items)
    return list(samples), torch.tensor(targets), torch.tensor(indices)


class EncodedBatchDecoder:
    """Main-process stage: a collated batch -> (images (B, 3, S, S) float, targets (B,)) on `device`.

    `dataset` is the `ImageFileDataset` the batch came from: a file the device cannot decode (and
    PIL neither) is reported to it (logged, marked, or DataError under on_bad_file=error) and, in
    training, replaced by the next decodable sample of the same batch; in evaluation its target
    becomes -1.
    """

    def __init__(
        self,
        dataset: Any,
        device: torch.device,
        size: int,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
    ) -> None:
        self.dataset, self.device, self.size, self.train = dataset, torch.device(device), size, train
        self.interp = interpolation_mode(interpolation)
        self.normalize = Normalize255(mean, std).to(self.device)

    def _decode(self, samples: list[EncodedSample], indices: Tensor) -> list[Tensor | None]:
        """uint8 (3, H, W) images on the device; None where the file cannot be decoded."""
        images: list[Tensor | None] = [
            s.data.to(self.device, non_blocking=True) if s.data.dim() == 3 else None for s in samples
        ]
        todo = [k for k, s in enumerate(samples) if s.data.dim() == 1]
        if not todo:
            return images
        try:  # one batched call (nvJPEG batched decode on CUDA)
            decoded = decode_jpeg([samples[k].data for k in todo], mode=ImageReadMode.RGB, device=self.device)
            for k, img in zip(todo, decoded):
                images[k] = img
            return images
        except RuntimeError:
            pass  # some file in the batch is bad: retry one by one, falling back to PIL
        for k in todo:
            images[k] = self._decode_one(samples[k].data, int(indices[k]))
        return images

    def _decode_one(self, data: Tensor, index: int) -> Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                return F.pil_to_tensor(to_rgb(img)).to(self.device)
        except Exception as exc:  # whatever PIL raises for a broken file
            self.dataset.report_bad_file(index, exc, substitute=self.train)
            return None

    def _crop(self, img: Tensor, params: Tensor) -> Tensor:
        resize_h, resize_w, top, left, h, w = params.tolist()
        if resize_h:  # evaluation: resize the whole image, then crop
            img = F.resize(img, [resize_h, resize_w], interpolation=self.interp, antialias=True)
        return F.resized_crop(img, top, left, h, w, [self.size, self.size], self.interp, antialias=True)

    def __call__(self, batch: tuple[list[EncodedSample], Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        samples, targets, indices = batch
        images = self._decode(samples, indices)
        good = [k for k, img in enumerate(images) if img is not None]
        if not good and self.train:
            raise DataError(
                f"None of the {len(samples)} images of a batch could be decoded (files: "
                f"{[self.dataset.path(int(i)) for i in indices[:3]]}...); check the data set's files."
            )
        out = torch.empty(len(samples), 3, self.size, self.size, dtype=torch.uint8, device=self.device)
        targets = targets.clone()
        for k, img in enumerate(images):
            if img is None:
                if self.train:  # deterministic stand-in: the next decodable sample of the batch
                    k_sub = min((j for j in good if j > k), default=good[0])
                    img, params = images[k_sub], samples[k_sub].params
                    targets[k] = targets[k_sub]
                else:
                    img, params = torch.zeros_like(out[k]), torch.tensor([0, 0, 0, 0, self.size, self.size])
                    targets[k] = -1
            else:
                params = samples[k].params
            assert img is not None
            out[k] = self._crop(img, params)
        flips = torch.tensor([s.flip for s in samples], device=self.device).view(-1, 1, 1, 1)
        out = torch.where(flips, out.flip(-1), out)
        return self.normalize(out), targets.to(self.device, non_blocking=True)  # (B, 3, S, S), (B,)

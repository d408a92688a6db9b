"""Image decoding, fused with the first crop/resize where that saves work.

The PIL loaders take a file path and draw their crop box from the image header (no decode needed);
JPEGs are then decoded at 1/2, 1/4 or 1/8 scale when the crop still has at least as many pixels as
the output (`Image.draft`, libjpeg's DCT-domain reduce). Training (`RandomResizedCropDecode`) crops
and resizes with torch's antialiased uint8 kernel; evaluation (`ResizeCenterCropDecode`) resamples
only the center-crop box with PIL, which gives the same pixels as PIL resize-then-crop (the filter
support reaches outside the box), i.e. the reference evaluation protocol.

Every decoder returns 8-bit RGB: grayscale, CMYK, palette and alpha images are converted, 16-bit
images are scaled to 8 bits (round(v * 255 / 65535)), animated images give their first frame, and a
truncated file is an error whatever PIL's global `ImageFile.LOAD_TRUNCATED_IMAGES` says (a truncated
file would otherwise decode with its missing part grey and be trained on).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor
from torchvision import transforms as tv_transforms
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from polyscale.errors import ConfigError

__all__ = [
    "Normalize255",
    "RandomResizedCropDecode",
    "ResizeCenterCropDecode",
    "center_crop_box",
    "decode_rgb_tensor",
    "interpolation_mode",
    "open_rgb",
    "pil_resample",
    "pil_to_chw",
    "resized_size",
    "to_rgb",
    "uint16_to_uint8",
]

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision interpolation mode from its name."""
    if name not in _INTERPOLATIONS:
        raise ConfigError(f"Unknown `interpolation`={name!r}; choose one of {sorted(_INTERPOLATIONS)}.")
    return _INTERPOLATIONS[name]


def pil_resample(name: str) -> Image.Resampling:
    return Image.Resampling[interpolation_mode(name).name]


def uint16_to_uint8(x: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """16-bit values -> uint8 round(v * 255 / 65535), exactly (v * 255 fits in int32)."""
    if isinstance(x, Tensor):
        return ((x.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return ((x.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def _load_strict(img: Image.Image) -> None:
    """Decode the pixels now, raising OSError for a truncated file even where someone set PIL's global
    LOAD_TRUNCATED_IMAGES (it would fill the missing part with grey)."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        img.load()
        return
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = True


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB (decodes the pixels; the first frame of an animated image).

    PIL's own convert("RGB") clips 16-bit grayscale ("I;16", and "I" from 16-bit PGM/PNG) at 255, which
    turns it nearly white: those are scaled instead. 32-bit float images have no defined 8-bit range and
    raise ValueError (a bad file).
    """
    _load_strict(img)  # decode now, while the file is open (and raise here for a broken one)
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{img.mode} image with values outside 0..65535: no defined 8-bit conversion")
        img = Image.fromarray(uint16_to_uint8(values))  # (H, W) uint8: mode L
    elif img.mode == "F":
        raise ValueError("32-bit floating-point image (mode F): no defined 8-bit conversion")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL wants palette transparency expanded before dropping it
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path: str) -> Image.Image:
    """Fully decoded RGB image (the reference loader; also the CPU fallback of the GPU path)."""
    with Image.open(path) as img:
        return to_rgb(img)


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `short`, rounding as torchvision's Resize does."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _draft(img: Image.Image, box: Sequence[float], out: int) -> tuple[Image.Image, tuple[float, ...]]:
    """Reduce-on-decode for JPEGs: the largest scale 1/s (s in 1, 2, 4, 8) keeping the box >= `out`.

    Returns the image (still lazy) and the box in its reduced coordinates.
    """
    reduce = min(box[2] - box[0], box[3] - box[1]) / out
    s = next(s for s in (8, 4, 2, 1) if s <= reduce) if reduce >= 1 else 1
    if s == 1 or img.format != "JPEG":
        return img, tuple(box)
    width, height = img.size
    # Pillow picks scale = min(W // req_w, H // req_h) rounded down to a power of two: exactly s here.
    if img.draft(None, (width // s, height // s)) is None:
        return img, tuple(box)
    # libjpeg's 1/s scaling maps source coordinate x to x / s (the size is rounded up: ceil(W / s)).
    return img, tuple(c / s for c in box)


class RandomResizedCropDecode:
    """Path -> uint8 tensor (3, size, size): RandomResizedCrop fused with the decode.

    The crop box comes from torchvision's `RandomResizedCrop.get_params` on the (undecoded) image,
    so it draws the same random numbers as the unfused transform. PIL decodes (at a reduced scale
    when the crop allows); torch's antialiased uint8 resize, fastest on the channels-last layout PIL
    decodes to, does the crop + resize (about 2.5x faster than PIL's resize here).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float],
        ratio: Sequence[float],
        interpolation: str = "bilinear",
        draft: bool = True,
    ) -> None:
        self.size, self.scale, self.ratio = size, list(scale), list(ratio)
        self.interpolation = interpolation_mode(interpolation)
        self.draft = draft

    def __call__(self, path: str) -> Tensor:
        with Image.open(path) as img:
            top, left, h, w = tv_transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
            if self.draft:
                img, box = _draft(img, (left, top, left + w, top + h), self.size)
                left, top = round(box[0]), round(box[1])  # whole pixels of the reduced image
                w, h = max(1, round(box[2]) - left), max(1, round(box[3]) - top)
            image = pil_to_chw(to_rgb(img))  # (3, H, W), channels-last strides
        out = F.resized_crop(
            image, top, left, h, w, [self.size, self.size], self.interpolation, antialias=True
        )
        return out.contiguous()  # (3, size, size)


class ResizeCenterCropDecode:
    """Path -> RGB PIL image: resize the shorter side to `resize`, center-crop `crop`, in one resample."""

    def __init__(self, resize: int, crop: int, interpolation: str = "bilinear", draft: bool = True) -> None:
        if crop > resize:
            raise ConfigError(f"Validation crop {crop} > its resize {resize}; use `crop_ratio` <= 1.")
        self.resize, self.crop = resize, crop
        self.resample = pil_resample(interpolation)
        self.draft = draft

    def __call__(self, path: str) -> Image.Image:
        with Image.open(path) as img:
            width, height = img.size
            new_h, new_w = resized_size(height, width, self.resize)
            top, left = center_crop_box(new_h, new_w, self.crop)
            sx, sy = width / new_w, height / new_h  # source pixels per resized pixel
            box: tuple[float, ...] = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
            if self.draft:
                img, box = _draft(img, box, self.crop)
            return to_rgb(img).resize((self.crop, self.crop), self.resample, box=box)


def decode_rgb_tensor(path: str) -> Tensor:
    """Path -> uint8 (3, H, W) with torchvision.io (libjpeg-turbo / libpng); PIL for other formats."""
    data = read_file(path)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        # decode_image knows JPEG/PNG/GIF/WebP/AVIF/HEIC only; BMP, TIFF, PPM and animated WebP go
        # through PIL (which also rejects truncated files, see to_rgb).
        return F.pil_to_tensor(open_rgb(path))
    if image.dim() == 4:  # animated GIF: (frames, 3, H, W)
        image = image[0]
    if image.dtype == torch.uint16:  # 16-bit PNG: decode_image keeps the 16-bit values
        image = uint16_to_uint8(image)
    return image


def pil_to_chw(img: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 (3, H, W) view of an (H, W, 3) array (channels-last strides)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class Normalize255:
    """uint8 (3, H, W) tensor or PIL image -> float32 (3, H, W): (x / 255 - mean) / std."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"`mean` and `std` need 3 values each (std > 0); got {mean} and {std}.")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.shift = torch.tensor([255.0 * m for m in self.mean], device=device).view(3, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=device).view(3, 1, 1)

    def to(self, device: torch.device | str) -> Normalize255:
        """The same normalisation with its constants on `device` (for batches there)."""
        return Normalize255(self.mean, self.std, device)

    def __call__(self, img: Tensor | Image.Image) -> Tensor:
        """Also takes a batch (B, 3, H, W): the constants broadcast."""
        x = pil_to_chw(img) if isinstance(img, Image.Image) else img
        # uint8 copy to contiguous first: the float passes then run on contiguous memory (2x faster)
        return x.contiguous().float().sub_(self.shift).mul_(self.scale)  # (..., 3, H, W)

"""Schema of the `data` config group."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Data set and input pipeline (`data=NAME`)."""

    name: str = "builtin"  # builtin | synthetic | cifar10 | cifar100 | imagenet | imagefolder
    root: str | None = None  # data set folder; imagenet also reads $IMAGENET_ROOT, cifar $CIFAR_ROOT
    num_classes: int | None = 10  # null: take the class count from the folder (imagefolder)
    image_size: int = 32  # training crop (validation follows crop_ratio)
    crop_ratio: float = 0.875  # validation: resize shorter side to crop/ratio, center-crop `crop` (224/256)
    batch_size: int = 128  # GLOBAL batch across all ranks, as the papers state it
    val_batch_size: int | None = None  # global; null = batch_size
    num_workers: int = 2  # per rank
    pin_memory: bool = True
    persistent_workers: bool = True
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bilinear"
    hflip: bool = True
    random_crop_padding: int = 4  # CIFAR-style pad + random crop (cifar, builtin)
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop (imagenet-style)
    rrc_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    auto_augment: str | None = None  # timm policy string, e.g. rand-m9-mstd0.5 or original
    decoder: str = "pil"  # pil | torchvision | cuda (torchvision.io.decode_jpeg on the GPU)
    jpeg_draft: bool = True  # PIL: JPEG reduce-on-decode when the crop stays >= output size (speed)
    gpu_augment: bool = False  # CIFAR: keep the whole set on the GPU and augment there
    on_bad_file: str = "skip"  # skip (log + count) | error
    # synthetic / builtin sizes
    num_train_samples: int = 5000
    num_val_samples: int = 1000

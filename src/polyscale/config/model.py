"""Schemas of the `model` and `model/conv` config groups.

The model code never sees these objects: `polyscale.models.build_model_from_config` turns them into
plain keyword arguments at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConvConfig:
    """The spatial convolution used in the middle of every bottleneck (`model/conv=NAME`)."""

    name: str = "standard"  # standard | psconv | pyconv | dynamic_psconv
    # PSConv (PSConv paper, Eq. 3): cyclic dilation pattern, t = len(pattern), and the axes it varies on.
    dilation_pattern: list[int] = field(default_factory=lambda: [1, 2, 1, 4])
    axes: str = "both"  # both | input | output
    # How PSConv runs (same values, different conv splits; docs/operators.md): null = the fastest
    # measured per device (autotuned on CUDA under cudnn.benchmark) | grouped | shifts | depthwise
    impl: str | None = None
    # PyConv: per-stage pyramid kernels and per-level group counts (one list per stage); null = the
    # network's defaults (polyscale.ops.pyconv).
    kernel_sizes: list[list[int]] | None = None
    pyramid_groups: list[list[int]] | None = None
    # Dynamic PSConv (PSConv paper, section 4.2): a learned Kronecker-factored binary mask gives every kernel
    # rates[1] (mask 1) or rates[0] (mask 0); init = the starting mask: small | large | static (PSConv's
    # {1, 2, 1, 4} pattern, its rates > 1 mapped to the large rate). docs/operators.md, "DynamicPSConv2d".
    rates: list[int] = field(default_factory=lambda: [1, 2])
    init: str = "static"
    # Optional regulariser (classification task): + large_fraction_weight * mean over dynamic layers of
    # (share of large-rate kernels - large_fraction_target)^2; weight 0 = off. The share is logged anyway.
    large_fraction_target: float = 0.5
    large_fraction_weight: float = 0.0
    # Renamed to pyramid_groups (it was read as the conv's groups); kept only so that the engine can
    # reject it with a message naming the new key. Checkpoints of older versions store it as null.
    groups: list[list[int]] | None = None


@dataclass
class ModelConfig:
    """A registered network (`model=NAME`) plus its conv type and init options."""

    name: str = "resnet20"
    conv: ConvConfig = field(default_factory=ConvConfig)
    num_classes: int | None = None  # null: take the data set's class count
    drop_rate: float = 0.0  # dropout before the classifier
    zero_init_last: bool = False  # zero-init the last BN of every residual branch
    checkpoint_path: str | None = None  # initialise weights from ours / a bare state dict / official files

"""polyscale: Poly-Scale and Pyramidal convolutions, their model zoo and a DDP trainer."""

__version__ = "0.1.0"

# Importing the models also registers the PS / PyConv / CIFAR names in timm's model registry.
from polyscale.detection import create_detector  # noqa: E402
from polyscale.models import create_model, list_models  # noqa: E402

__all__ = ["__version__", "create_detector", "create_model", "list_models"]

"""polyscale: Poly-Scale and Pyramidal convolutions, their model zoo and a DDP trainer."""

__version__ = "0.1.0"

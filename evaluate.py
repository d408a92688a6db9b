"""Evaluate a checkpoint: `python evaluate.py checkpoint=PATH [data=NAME data.root=DIR] [eval.KEY=...]`.

The model is rebuilt from the config stored in the checkpoint (bare state dicts: add model=NAME). Works
under torchrun with exact sharding. Options: configs/eval.yaml and docs/training.md.
"""

import sys

import hydra
from omegaconf import DictConfig

from polyscale.cli import open_data_keys, prepare_launch
from polyscale.cli.evaluate import run


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    prepare_launch()
    open_data_keys(sys.argv)
    main()

"""Train a network: `python train.py [model=NAME] [data=NAME data.root=DIR] [key=value ...]`.

Distributed: `torchrun --nproc_per_node=N train.py ...`. Continue a run: `python train.py
trainer.resume=auto hydra.run.dir=RUN_DIR`. Options and examples: docs/training.md.
"""

import hydra
from omegaconf import DictConfig

from polyscale.cli import prepare_launch
from polyscale.cli.train import run


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    prepare_launch()
    main()

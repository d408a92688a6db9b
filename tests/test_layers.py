"""The layering contract: the library (ops, models, data, the top-level package) works without Hydra and
OmegaConf, which only the engine reads (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hydra"] = None  # import hydra / omegaconf (or any submodule) now raises ImportError
    sys.modules["omegaconf"] = None
    import torch
    import polyscale
    from polyscale import data, models, ops
    model = polyscale.create_model("ps_resnet20", num_classes=10)
    images, target = data.build_dataset("val", name="builtin", num_val_samples=4, image_size=16)[0]
    logits = model(images[None])
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    loaded = [m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf") and sys.modules[m]]
    print("ok", sorted(loaded))
    """
)


def test_library_imports_and_works_without_hydra_and_omegaconf() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok []"

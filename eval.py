#!/usr/bin/env python
"""Rate-distortion table of a trained checkpoint on a dataset (Lightning + Hydra).

    python eval.py ckpt_path=outputs/train/<run>/checkpoints/last.ckpt
    python eval.py ckpt_path=... data.val_fraction=1.0          # whole sample images
    python eval.py ckpt_path=... data=image_folder data.root=DIR
    python eval.py ckpt_path=... data=vectors data.path=x.npy
    python eval.py ckpt_path=my.ckpt module_class=my_package.MyModel   # your own LightningModule
    python eval.py ckpt_path=my.ckpt data=vectors data.path=latents.npy  # its ScalableVQ alone

Loads the LightningModule from the checkpoint (this package's modules record their
class), runs one validation pass over the data module's validation split with the
:class:`~svq_modules.lightning.RateDistortionCallback`, prints the RD table and writes
``rd_curve.png`` / ``rd_layers.png`` / ``rd_table.json`` / ``metrics.csv`` into Hydra's run
directory (``outputs/eval/<date>_<time>``). With the data settings of the training run
it reproduces the last validation's figures of that run.
"""

import hydra
from omegaconf import DictConfig

from svq_modules.lightning.entry import evaluate, hydra_argv, run_checked


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return run_checked(evaluate, cfg)


if __name__ == "__main__":
    hydra_argv()
    main()

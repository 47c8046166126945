#!/usr/bin/env python
"""Train a model with a ScalableVQ bottleneck (Lightning + Hydra).

    python train.py                                   # conv autoencoder on sklearn's sample images
    python train.py experiment=default_images         # the same run, its settings spelled out
    python train.py bits=[4,2,2,2,2]                   # explicit bit list (base layer first)
    python train.py proposal=balanced_clusters         # named bit proposal (proposal.num_layers=6)
    python train.py data=vectors data.path=x.npy       # plain [N, D] vectors, quantizer only
    python train.py data=image_folder data.root=DIR    # your own images
    python train.py model.codebook_size=256 trainer.max_epochs=4 seed=1
    python train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2
    python train.py debug=fast_dev_run                 # one batch of training and validation
    python train.py ckpt_path=outputs/train/<run>/checkpoints/last.ckpt   # resume

Outputs land in Hydra's run directory (``outputs/train/<date>_<time>``): ``metrics.csv``
(CSVLogger), ``checkpoints/last.ckpt``, ``rd_curve.png``, ``rd_layers.png``,
``rd_table.json``, ``.hydra/`` (the composed config) and ``train.log``.

Every setting is checked before anything heavy happens: a wrong one stops with a
one-line error and exit status 2 (see :mod:`svq_modules.lightning.entry`).
"""

import hydra
from omegaconf import DictConfig

from svq_modules.lightning.entry import hydra_argv, run_checked, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_checked(train, cfg)


if __name__ == "__main__":
    hydra_argv()
    main()

"""A Hugging Face checkpoint's architecture, to evaluate or fine-tune it (`moe_jax.hf`).

    python -m moe_jax.train --config=configs/hf.py:/path/to/switch-base-8 --workdir=runs/ft

`get_config(DIR)` is `moe_jax.hf.load_config(DIR)` (the checkpoint's sizes, layer placement,
router and loss settings written over `moe_jax.config.default_config()`) with
`train.init_from='hf:DIR'`, so a new run starts from the checkpoint's weights. Families:
`moe_jax.hf.family_names()`. Override anything else on the command line as usual
(`--config.moe.expert_dropout=0.4`, `--config.train.learning_rate=1e-4`, ...).
"""

import ml_collections

from moe_jax import hf


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The config of the Hugging Face checkpoint directory `variant`."""
    if not variant:
        raise ValueError(
            "configs/hf.py needs the checkpoint directory: --config=configs/hf.py:/path/to/DIR."
        )
    config = hf.load_config(variant)
    config.train.init_from = f"hf:{variant}"
    return config

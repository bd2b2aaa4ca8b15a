"""Config overrides for training runs small enough to compile and run in seconds in tests."""

TINY_TRAINING = {
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.head_dim": 16,
    "model.d_ff": 64,
    "model.num_layers": 2,
    "moe.num_experts": 4,
    "moe.group_size": 32,
    "train.batch_size": 8,
    "train.seq_len": 32,
    "train.warmup_steps": 2,
    "train.log_every": 1,
    "mesh.data": 1,
}


def configured(config, settings: dict, overrides: dict):
    """`config` with `settings` (keys 'section.name') and then `overrides` (keys
    'section__name', as keyword arguments spell them) set in it."""
    dotted = {key.replace("__", "."): value for key, value in overrides.items()}
    for key, value in {**settings, **dotted}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config

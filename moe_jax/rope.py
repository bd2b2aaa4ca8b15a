"""Rotary frequencies: plain RoPE's and YaRN's (Peng et al. 2023, arXiv 2309.00071).

`rope_frequencies(head_dim, theta, yarn)` gives the inverse frequencies `f32[D/2]` by which
`rope_attention.rotary_embedding` turns each feature pair per position, and the factor its cos
and sin are multiplied by, as transformers' `ROPE_INIT_FUNCTIONS['default' | 'yarn']` (5.x)
compute them. Plain RoPE: pair i turns at `w_i = theta**(-2i/D)`, factor 1.

YaRN (`model.rope_type = 'yarn'`; gpt-oss, Qwen3's long context, DeepSeek-V3) stretches a
context of `original_max_positions` by `factor`:

- A pair that turns many times over the original context has seen every phase: it keeps `w_i`
  (extrapolation). One that turns less than once would meet unseen angles: it turns at
  `w_i / factor` (interpolation). Pair `d(r) = D ln(original_max_positions / (2 pi r)) /
  (2 ln theta)` turns r times over the original context; between `low = d(beta_fast)` and
  `high = d(beta_slow)` the two blend linearly: `ramp_i = clip((i - low) / (high - low), 0, 1)`,
  `inv_freq_i = (w_i / factor) ramp_i + w_i (1 - ramp_i)`. With `truncate`, low is rounded down
  and high up to whole pairs (transformers' default; gpt-oss turns it off); then low is clipped
  at 0 and high at D - 1 (transformers' bound); `high == low` is moved to `low + 0.001`.
- The attention scaling: `attention_factor` when set, else `m(factor, mscale) /
  m(factor, mscale_all_dim)` when both are set (DeepSeek), else `m(factor, 1)`, where
  `m(s, c) = 0.1 c ln(s) + 1` (1 for `s <= 1`). It multiplies cos and sin, so the attention
  logits by its square.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "yarn")


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN's settings (see the module docstring); errors name the `config.model` keys.

    Zero `attention_factor` takes YaRN's from `factor`; zero `mscale` or `mscale_all_dim`
    leaves DeepSeek's ratio out.
    """

    factor: float
    original_max_positions: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 0.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        if not self.factor >= 1:
            raise ValueError(f"model.rope_factor={self.factor!r} must be >= 1 for YaRN.")
        if not self.original_max_positions >= 1:
            raise ValueError(
                f"model.rope_original_max_positions={self.original_max_positions!r} must be >= 1 "
                "for YaRN (the context length the checkpoint was pretrained on)."
            )
        if not 0 < self.beta_slow <= self.beta_fast:
            raise ValueError(
                f"model.rope_beta_slow={self.beta_slow!r} and model.rope_beta_fast="
                f"{self.beta_fast!r} must satisfy 0 < rope_beta_slow <= rope_beta_fast."
            )
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if not getattr(self, key) >= 0:
                raise ValueError(
                    f"model.rope_{key}={getattr(self, key)!r} must be >= 0 (0: unused)."
                )

    def correction_range(self, head_dim: int, theta: float) -> tuple[float, float]:
        """(low, high): the pair indices between which the ramp rises from 0 to 1."""

        def pair_turning(rotations: float) -> float:
            turns = self.original_max_positions / (rotations * 2 * math.pi)
            return head_dim * math.log(turns) / (2 * math.log(theta))

        low, high = pair_turning(self.beta_fast), pair_turning(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, head_dim - 1)

    def magnitude(self, coefficient: float) -> float:
        """`m(factor, coefficient) = 0.1 coefficient ln(factor) + 1` (1 for `factor <= 1`)."""
        return 1.0 if self.factor <= 1 else 0.1 * coefficient * math.log(self.factor) + 1.0

    def attention_scaling(self) -> float:
        """The factor on cos and sin."""
        if self.attention_factor:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return self.magnitude(self.mscale) / self.magnitude(self.mscale_all_dim)
        return self.magnitude(1.0)


def yarn_from_config(model) -> YarnScaling | None:
    """The YaRN settings of `config.model` (`rope_type`, `rope_factor`, ...); None for plain
    RoPE."""
    if model.rope_type not in ROPE_TYPES:
        raise ValueError(f"model.rope_type={model.rope_type!r} is not one of {ROPE_TYPES}.")
    if model.rope_type == "default":
        return None
    return YarnScaling(
        factor=float(model.rope_factor),
        original_max_positions=int(model.rope_original_max_positions),
        beta_fast=float(model.rope_beta_fast),
        beta_slow=float(model.rope_beta_slow),
        truncate=bool(model.rope_truncate),
        attention_factor=float(model.rope_attention_factor),
        mscale=float(model.rope_mscale),
        mscale_all_dim=float(model.rope_mscale_all_dim),
    )


def rope_frequencies(
    head_dim: int, theta: float, yarn: YarnScaling | None = None
) -> tuple[jax.Array, float]:
    """(inverse frequencies `f32[D/2]`, the factor on cos and sin) of plain RoPE or YaRN."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [h]
    if yarn is None:
        return 1.0 / (theta**exponents), 1.0
    powers = theta**exponents  # [h] 1 / w_i
    extrapolated, interpolated = 1.0 / powers, 1.0 / (yarn.factor * powers)  # [h]
    low, high = yarn.correction_range(head_dim, theta)
    if high == low:
        high += 0.001
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolated_share = 1 - ramp  # [h]
    inv_freq = interpolated * (1 - extrapolated_share) + extrapolated * extrapolated_share
    return inv_freq, yarn.attention_scaling()

"""`QuantConfig`: the frozen, hashable description of how a layer is quantized."""

from __future__ import annotations

import dataclasses

METHODS = ("none", "absmean", "twn", "tequila", "tequila_dynamic", "minima")
GRANULARITIES = ("per_group", "per_channel", "per_tensor")
STAT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How a `[in, out]` kernel is ternarized (Tequila, arXiv 2509.23809).

  Attributes:
    method: one of `METHODS` (§1.4).
    granularity: `per_group` (groups of `group_size` consecutive inputs for each
      output unit), `per_channel` (one group per output unit) or `per_tensor`.
    group_size: G for `per_group`; ignored otherwise.
    lam: Tequila's reactivation strength λ (`tequila`, `tequila_dynamic`).
    eps: the constant of the `minima` reactivation term.
    stat_dtype: `float32` (default: alpha and delta in fp32, or fp64 for fp64
      weights) or `bfloat16`, the official code's statistics on bf16 weights:
      W rounded to bf16, alpha = bf16(mean|W|) accumulated in fp32, delta =
      bf16(alpha / 2). Converting a checkpoint the official run saved needs
      `bfloat16` to reproduce its codes and scales exactly.
  """

  method: str = "tequila"
  granularity: str = "per_group"
  group_size: int = 128
  lam: float = 1e-3
  eps: float = 1e-3
  stat_dtype: str = "float32"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(
          f"Unknown quant method {self.method!r}; choose one of {METHODS}.")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"Unknown granularity {self.granularity!r}; choose one "
                       f"of {GRANULARITIES}.")
    if self.granularity == "per_group" and self.group_size <= 0:
      raise ValueError(
          f"group_size must be positive, got {self.group_size}.")
    if self.lam < 0:
      raise ValueError(f"lam must be >= 0 (got {self.lam}); lam = 0 is the "
                       "AbsMean-STE baseline.")
    if self.eps < 0:
      raise ValueError(f"eps must be >= 0, got {self.eps}.")
    if self.stat_dtype not in STAT_DTYPES:
      raise ValueError(f"Unknown stat_dtype {self.stat_dtype!r}; choose one "
                       f"of {STAT_DTYPES}.")

  @property
  def is_ternary(self) -> bool:
    return self.method != "none"

  def describe(self) -> str:
    """One line for logs and reports, e.g. 'tequila per_group G=64 λ=0.001'."""
    if not self.is_ternary:
      return "none (float)"
    parts = [self.method, self.granularity]
    if self.granularity == "per_group":
      parts.append(f"G={self.group_size}")
    if self.method.startswith("tequila"):
      parts.append(f"λ={self.lam:g}")
    if self.method == "minima":
      parts.append(f"eps={self.eps:g}")
    if self.stat_dtype != "float32":
      parts.append(f"stats in {self.stat_dtype}")
    return " ".join(parts)

  @property
  def bias_lam(self) -> float:
    """λ of the input-independent bias c(W): non-zero only for `tequila`."""
    return self.lam if self.method == "tequila" else 0.0

  def num_groups(self, in_features: int) -> int:
    """Groups along the input axis for one output unit."""
    if self.granularity == "per_group":
      return in_features // self.group_size
    return 1

  def check_kernel_shape(self, shape, name: str = "kernel") -> None:
    """Raises a `ValueError` naming the problem and the fix for a bad kernel."""
    if len(shape) != 2:
      raise ValueError(f"{name}: expected a 2-D [in, out] kernel, got shape "
                       f"{tuple(shape)}.")
    d_in = shape[0]
    if (self.is_ternary and self.granularity == "per_group"
        and d_in % self.group_size):
      divisors = [g for g in (256, 128, 64, 32, 16) if d_in % g == 0]
      raise ValueError(
          f"{name} of shape [in={d_in}, out={shape[1]}]: in_features {d_in} "
          f"is not a multiple of group_size {self.group_size}. Use a "
          f"group_size that divides {d_in} (e.g. {divisors or [d_in]}) or "
          "granularity='per_channel'.")

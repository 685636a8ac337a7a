"""`QuantConfig`: the frozen, hashable description of how a layer is
quantized, and the choices of its fields. Plain Python (no JAX): a process
that only names methods (a sweep's parent) imports it alone."""

from __future__ import annotations

import dataclasses

ACT_BITS = (0, 8)  # 0: activations as they are; 8: per-token absmax int8
METHODS = ("none", "absmean", "twn", "tequila", "tequila_dynamic", "minima",
           "lsq", "seq", "dlt", "sherry")
# Methods whose scale alpha is a learned parameter (LSQ, ParetoQ's SEQ,
# TernaryLLM's DLT), initialized to max|W| of each group.
LEARNED_SCALE_METHODS = ("lsq", "seq", "dlt")
GRANULARITIES = ("per_group", "per_channel", "per_tensor")
# How Tequila's λ is held: `fixed` (the published recipe), learned per layer
# or per output unit (λ = lam · exp(θ), θ learned from the task loss), or
# `v3`, the official code's `ultraquantv3` (a per-weight Λ fitted by a local
# regression).
LAM_MODES = ("fixed", "per_layer", "per_channel", "v3")
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
    lam_mode: how λ is held (`LAM_MODES`; `tequila` only): `fixed` λ = lam;
      `per_layer` / `per_channel` λ = lam · exp(θ) with θ a learned scalar /
      `[out]` vector starting at 0; `v3` the official `ultraquantv3`'s
      per-weight Λ (`[in, out]`, N(0, lam_std²) at init; lam unused).
    lam_std: standard deviation of v3's Λ at initialization (the official
      `range_of_lambada`, 0.01).
    act_bits: 0 (activations as computed) or 8: W1.58A8, the input of every
      ternary projection fake-quantized to int8 per token (absmax) with a
      straight-through gradient, as the CPU `int8` kernel quantizes it. Part
      of the architecture: exports record it and the packed model applies it.
    arenas_max_eps: `sherry` only: the peak ε of the Arenas residual
      `x·(Q + εW)` in training (`quant.arenas_eps`); 0 is Sherry without
      Arenas (the ablation). Inference and exports always use ε = 0.
    arenas_warmup_fraction: `sherry` only: the share of the run's steps over
      which ε rises linearly to `arenas_max_eps` (then a cosine to 0).
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
  lam_mode: str = "fixed"
  lam_std: float = 0.01
  act_bits: int = 0
  arenas_max_eps: float = 1.0
  arenas_warmup_fraction: float = 0.1

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
    if self.lam_mode not in LAM_MODES:
      raise ValueError(f"Unknown lam_mode {self.lam_mode!r}; choose one of "
                       f"{LAM_MODES}.")
    if self.lam_mode != "fixed" and self.method != "tequila":
      raise ValueError(
          f"lam_mode={self.lam_mode!r} learns Tequila's bias strength, but "
          f"method is {self.method!r}: use method='tequila' or "
          "lam_mode='fixed'.")
    if self.lam_mode in ("per_layer", "per_channel") and self.lam <= 0:
      raise ValueError(f"lam_mode={self.lam_mode!r} learns λ = lam·exp(θ) "
                       f"relative to lam, which must be > 0 (got {self.lam}).")
    if self.act_bits not in ACT_BITS:
      raise ValueError(f"act_bits={self.act_bits}: use 0 (no activation "
                       "quantization) or 8 (int8 per token, W1.58A8).")
    if self.act_bits and self.method == "none":
      raise ValueError("act_bits=8 quantizes the input of ternary "
                       "projections, but method is 'none' (float): choose a "
                       "ternary method or act_bits=0.")
    if self.lam_std < 0:
      raise ValueError(f"lam_std must be >= 0, got {self.lam_std}.")
    if self.method == "sherry":
      if self.stat_dtype != "float32":
        raise ValueError("method 'sherry' keeps the 3 largest |W| of every 4 "
                         "in fp32 statistics: use stat_dtype='float32'.")
      if self.granularity == "per_group" and self.group_size % 4:
        raise ValueError(f"method 'sherry' quantizes blocks of 4 inputs: "
                         f"group_size {self.group_size} must be a multiple "
                         "of 4.")
    elif (self.arenas_max_eps, self.arenas_warmup_fraction) != (1.0, 0.1):
      raise ValueError(f"arenas_max_eps / arenas_warmup_fraction set the "
                       f"Arenas residual of method 'sherry'; method is "
                       f"{self.method!r}: leave them at 1.0 / 0.1.")
    if self.arenas_max_eps < 0:
      raise ValueError(f"arenas_max_eps must be >= 0 (0: Sherry without "
                       f"Arenas), got {self.arenas_max_eps}.")
    if not 0 <= self.arenas_warmup_fraction <= 1:
      raise ValueError(f"arenas_warmup_fraction must be in [0, 1], got "
                       f"{self.arenas_warmup_fraction}.")
    if self.learned_scale and self.stat_dtype != "float32":
      raise ValueError(f"stat_dtype={self.stat_dtype!r} reproduces the "
                       "official absmean statistics; method "
                       f"{self.method!r} learns its scale: use float32.")

  @property
  def is_ternary(self) -> bool:
    return self.method != "none"

  @property
  def learned_scale(self) -> bool:
    """alpha (and DLT's gamma) are learned parameters (`lsq`, `seq`, `dlt`)."""
    return self.method in LEARNED_SCALE_METHODS

  def learns_like(self, other: "QuantConfig") -> bool:
    """Whether `other` learns the same quantizer parameters (same method,
    λ mode, granularity and groups): trained ones then carry over; fields
    such as lam, eps or act_bits do not matter."""
    groups = lambda c: c.group_size if c.granularity == "per_group" else 0  # noqa: E731
    return (self.method, self.lam_mode, self.granularity, groups(self)) == (
        other.method, other.lam_mode, other.granularity, groups(other))

  @property
  def learned_lam(self) -> bool:
    """λ is a learned parameter (any `lam_mode` but `fixed`)."""
    return self.lam_mode != "fixed"

  def describe(self) -> str:
    """One line for logs and reports, e.g. 'tequila per_group G=64 λ=0.001'."""
    if not self.is_ternary:
      return "none (float)"
    parts = [self.method, self.granularity]
    if self.granularity == "per_group":
      parts.append(f"G={self.group_size}")
    if self.lam_mode == "v3":
      parts.append(f"λ per weight (v3, std {self.lam_std:g})")
    elif self.learned_lam:
      parts.append(f"λ learned {self.lam_mode} from {self.lam:g}")
    elif self.method.startswith("tequila"):
      parts.append(f"λ={self.lam:g}")
    if self.method == "minima":
      parts.append(f"eps={self.eps:g}")
    if self.method == "sherry":
      parts.append(f"3:4 Arenas ε≤{self.arenas_max_eps:g} warmup "
                   f"{self.arenas_warmup_fraction:g}"
                   if self.arenas_max_eps else "3:4 no Arenas")
    if self.stat_dtype != "float32":
      parts.append(f"stats in {self.stat_dtype}")
    if self.act_bits:
      parts.append(f"A{self.act_bits}")
    return " ".join(parts)

  @property
  def bias_lam(self) -> float:
    """The fixed λ of the input-independent bias c(W): non-zero only for
    `tequila` with `lam_mode="fixed"` (learned modes hold λ as parameters)."""
    return self.lam if self.method == "tequila" and not self.learned_lam else 0.0

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
    if self.method == "sherry" and d_in % 4:
      raise ValueError(
          f"{name} of shape [in={d_in}, out={shape[1]}]: method 'sherry' "
          f"keeps 3 of every 4 inputs, so in_features must be a multiple of "
          f"4 (got {d_in}); use another method for this layer's shape.")
    if (self.is_ternary and self.granularity == "per_group"
        and d_in % self.group_size):
      divisors = [g for g in (256, 128, 64, 32, 16) if d_in % g == 0]
      raise ValueError(
          f"{name} of shape [in={d_in}, out={shape[1]}]: in_features {d_in} "
          f"is not a multiple of group_size {self.group_size}. Use a "
          f"group_size that divides {d_in} (e.g. {divisors or [d_in]}) or "
          "granularity='per_channel'.")

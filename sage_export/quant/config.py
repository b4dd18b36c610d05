"""Every knob of SAGE-PTQ (SPEC §2), so each component can be varied or switched off in an ablation.

The defaults are the product's configuration. `validate()` is cheap and is called before any long work, so a bad
value fails in one line instead of after minutes of quantization.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

THRESHOLDS = ("quantile", "gaussian")
SCALE_MODES = ("groups", "per_row")
MAX_GROUPS = 256  # group indices are stored as uint8 and in at most 8 bit-planes
MIN_SALIENT_BITS, MAX_SALIENT_BITS = 2, 8  # the op's salient_q is int8


@dataclass(frozen=True)
class SageConfig:
    # 1. Saliency filter: "quantile" takes exactly the ρ fraction with the largest |W − μ|; "gaussian" takes
    #    |W − μ| > Φ⁻¹(1 − ρ/2)·σ, whose realised fraction follows the data's tails.
    threshold: str = "quantile"

    # 2. Graph-guided group count.
    graph_samples: int = 5000  # unsalient values subsampled for the kNN graph ...
    graph_min_fraction: float = 0.0003  # ... but at least this fraction of the matrix (the paper's 0.03 %)
    knn_k: int = 10
    group_candidates: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    kmeans_n_init: int = 10  # k-means restarts per candidate K, as scikit-learn's SpectralClustering does
    lloyd_steps: int = 5  # 1-D Lloyd refinements of the band centres over the whole unsalient set
    lloyd_tol: float = 0.0  # ... ending early once no centre moves more than this × the largest (0: not at all)

    # 3. Dual-mode quantizer.
    salient_bits: int = 4
    scale_fit_iters: int = 5  # alternating (q, s) steps of the per-row salient scale fit

    # 4. Adaptive saliency threshold (bounded Brent on ρ).
    rho_bounds: tuple[float, float] = (0.001, 0.10)
    # Price per stored byte in the search's objective, error + rho_price·bytes (in the error's units). 0 is the
    # paper's objective, reconstruction error alone, which more salient weights always lower.
    rho_price: float = 0.0
    brent_xatol: float = 2e-4
    brent_maxiter: int = 50
    # The graph step runs once, before ρ* is known; None means the middle of rho_bounds (0.0505 by default). That
    # gives it an unsalient set like the one at any ρ the search can pick: removing 0.1 % or 10 % of the extremes
    # barely moves the bulk of |w| whose band structure the graph measures. It also follows --rho-bounds.
    # When set, the search also evaluates it, so a known good ρ (a budget's grid choice) is never lost.
    rho_init: float | None = None
    regraph_in_search: bool = False  # re-run the graph step at every ρ the search evaluates (slow)

    # Ablation switches.
    fixed_rho: float | None = None  # use this ρ and skip the Brent search
    fixed_groups: int | None = None  # use this G and skip the graph step (centres start at quantile bins)
    # "per_row": one float16 scale per output row for the unsalient weights instead of G matrix-wide group
    # scales. NOT exportable: the SageBinaryGemm op only has matrix-wide group scales.
    scale_mode: str = "groups"
    # Groups mode with one float16 multiplier r_n per output row (the op's row_scales), fitted when the matrix
    # is built by row_fit_rounds of alternating least squares from the plain solution, kept only where they lower
    # the error (quant/sage.py). Off: every r_n is 1, contract v1's meaning.
    row_multipliers: bool = False
    row_fit_rounds: int = 3
    # α_g = Σc|w|² / Σc|w| instead of the least-squares Σc|w| / Σc. Least squares makes each band's stored values
    # shrink the layer's output (its regression on the weights has gain 1 − the band's relative spread); this
    # choice keeps gain 1, for a little more squared error (which is what options and reports then measure).
    unit_gain: bool = False

    def __post_init__(self) -> None:
        # JSON manifests and argparse hand over lists; keep the dataclass hashable and comparable.
        for name in ("group_candidates", "rho_bounds"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @property
    def graph_rho(self) -> float:
        """The ρ whose unsalient set the graph step sees (fixed_rho, when set, is the only ρ there is)."""
        if self.fixed_rho is not None:
            return float(self.fixed_rho)
        return float(self.rho_init) if self.rho_init is not None else sum(self.rho_bounds) / 2

    @property
    def exportable(self) -> bool:
        return self.scale_mode == "groups"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SageConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAGE config keys: {', '.join(unknown)}")
        return cls(**data)

    def validate(self) -> None:
        """Raise ValueError with one clear line for the first bad value."""
        for check in _CHECKS:
            message = check(self)
            if message:
                raise ValueError(f"SAGE config: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choices(c: SageConfig) -> str | None:
    if c.threshold not in THRESHOLDS:
        return f"threshold must be one of {', '.join(THRESHOLDS)}, got {c.threshold!r}"
    if c.scale_mode not in SCALE_MODES:
        return f"scale_mode must be one of {', '.join(SCALE_MODES)}, got {c.scale_mode!r}"
    if not isinstance(c.regraph_in_search, bool):
        return f"regraph_in_search must be true or false, got {c.regraph_in_search!r}"
    return None


def _check_graph(c: SageConfig) -> str | None:
    if not _is_int(c.graph_samples) or c.graph_samples < 2:
        return f"graph_samples must be an integer >= 2, got {c.graph_samples!r}"
    if not _is_number(c.graph_min_fraction) or not 0 <= c.graph_min_fraction <= 1:
        return f"graph_min_fraction must be in [0, 1], got {c.graph_min_fraction!r}"
    if not _is_int(c.knn_k) or c.knn_k < 1:
        return f"knn_k must be an integer >= 1, got {c.knn_k!r}"
    cands = c.group_candidates
    if (not isinstance(cands, tuple) or not cands
            or not all(_is_int(k) and 2 <= k <= MAX_GROUPS for k in cands)):
        return f"group_candidates must be a non-empty list of integers in 2..{MAX_GROUPS}, got {cands!r}"
    if not _is_int(c.kmeans_n_init) or c.kmeans_n_init < 1:
        return f"kmeans_n_init must be an integer >= 1, got {c.kmeans_n_init!r}"
    if not _is_int(c.lloyd_steps) or c.lloyd_steps < 0:
        return f"lloyd_steps must be an integer >= 0, got {c.lloyd_steps!r}"
    if not _is_number(c.lloyd_tol) or not 0 <= c.lloyd_tol < 1:
        return f"lloyd_tol must be in [0, 1), got {c.lloyd_tol!r}"
    return None


def _check_quantizer(c: SageConfig) -> str | None:
    if not _is_int(c.salient_bits) or not MIN_SALIENT_BITS <= c.salient_bits <= MAX_SALIENT_BITS:
        return f"salient_bits must be an integer in {MIN_SALIENT_BITS}..{MAX_SALIENT_BITS}, got {c.salient_bits!r}"
    if not _is_int(c.scale_fit_iters) or c.scale_fit_iters < 0:
        return f"scale_fit_iters must be an integer >= 0, got {c.scale_fit_iters!r}"
    return None


def _check_search(c: SageConfig) -> str | None:
    bounds = c.rho_bounds
    if (not isinstance(bounds, tuple) or len(bounds) != 2 or not all(_is_number(b) for b in bounds)
            or not 0 <= bounds[0] < bounds[1] < 1):
        return f"rho_bounds must be two numbers with 0 <= lo < hi < 1, got {bounds!r}"
    if not _is_number(c.brent_xatol) or not 0 < c.brent_xatol < bounds[1] - bounds[0]:
        return f"brent_xatol must be > 0 and smaller than the rho_bounds interval, got {c.brent_xatol!r}"
    if not _is_number(c.rho_price) or not c.rho_price >= 0 or c.rho_price == float("inf"):
        return f"rho_price must be a finite number >= 0, got {c.rho_price!r}"
    if not _is_int(c.brent_maxiter) or c.brent_maxiter < 1:
        return f"brent_maxiter must be an integer >= 1, got {c.brent_maxiter!r}"
    if c.rho_init is not None and (not _is_number(c.rho_init) or not bounds[0] <= c.rho_init <= bounds[1]):
        return f"rho_init must lie within rho_bounds {bounds}, got {c.rho_init!r}"
    return None


def _check_ablations(c: SageConfig) -> str | None:
    if c.fixed_rho is not None and (not _is_number(c.fixed_rho) or not 0 <= c.fixed_rho < 1):
        return f"fixed_rho must be in [0, 1), got {c.fixed_rho!r}"
    if c.fixed_groups is not None and (not _is_int(c.fixed_groups) or not 1 <= c.fixed_groups <= MAX_GROUPS):
        return f"fixed_groups must be an integer in 1..{MAX_GROUPS}, got {c.fixed_groups!r}"
    if not isinstance(c.row_multipliers, bool):
        return f"row_multipliers must be true or false, got {c.row_multipliers!r}"
    if not _is_int(c.row_fit_rounds) or c.row_fit_rounds < 1:
        return f"row_fit_rounds must be an integer >= 1, got {c.row_fit_rounds!r}"
    if not isinstance(c.unit_gain, bool):
        return f"unit_gain must be true or false, got {c.unit_gain!r}"
    if c.row_multipliers and c.scale_mode != "groups":
        return "row_multipliers applies to scale_mode 'groups' only"
    return None


_CHECKS = (_check_choices, _check_graph, _check_quantizer, _check_search, _check_ablations)


# ------------------------------------------------------------------------------------------------ presets

# ρ grid of the budget's measurements: 0 and 19 points from 0.01 % to 5 % in equal ratios (×1.41 a step); with
# refine_rho the ρ search then refines the chosen point between its grid neighbours.
RHO_GRID: tuple[float, ...] = (0.0,) + tuple(float(f"{r:.4g}") for r in
                                             [1e-4 * (500 ** (i / 18)) for i in range(19)])
GROUP_CHOICES = ("budget", "graph")


@dataclass(frozen=True)
class SageRecipe:
    """Model-level choices of the product default (SPEC §2.1): what calibration feeds the quantizer and how a
    budget of true bits per weight is spent. Each switch is one ablation of the quality table."""

    bits: float = 3.2  # target true bits per weight over all quantized Linear layers (every stored byte)
    group_options: tuple[int, ...] = (1, 2, 4, 8, 16)  # G per matrix; others cost the planes of the next power of 2
    rho_grid: tuple[float, ...] = RHO_GRID
    activation_weighting: bool = True  # weight every error by the input channel's h_k = E[x_k²]
    layer_sensitivity: bool = True  # weight each layer's error by its measured loss sensitivity
    # ... raised to this power: 1 takes the one-pass estimate at face value; below 1 shrinks its spread between
    # layers (a noisy estimate then moves fewer bits), 0 ignores it.
    sensitivity_power: float = 1.0
    # Column weights are m·(h/m)^activation_power (m: the layer's mean h): below 1 the quantizer of each matrix
    # spreads its care over more input channels instead of the few with massive activations. Chosen on dev data
    # (docs/sage_v2.md): 0.5 beat 1 on both dev texts of SmolLM2-135M and of Qwen2.5-Coder-1.5B.
    activation_power: float = 0.5
    # ... or rather, per model, the best of these powers: the options are measured at each, each allocation is built
    # without compensation, and the model's mean loss on validation rows (sampled apart, in no statistic) picks the
    # power the rest of the run uses. The families want different powers on their dev texts (docs/sage_v2.md: ½
    # for SmolLM2-135M, ¼ for Qwen2.5-Coder-1.5B), and this choice picks each one's. Empty: activation_power alone
    # (an explicit activation_power means that, see from_fields).
    activation_power_candidates: tuple[float, ...] = (0.5, 0.25)
    # ... comparing the candidates' allocations at this budget, not the run's own (None: the run's): the power
    # describes the model's activations, not the budget, and the validation rows tell the powers apart where the
    # budget is tight enough for them to differ and loose enough for the uncompensated builds to rank them as the
    # compensated results rank (docs/sage_v2.md, "Activation power chosen at 3.2 bits"). Where the options cannot
    # store so few bits, at the least they can store (pipeline/sage_v2.py: comparison_bits).
    activation_power_bits: float | None = 3.2
    # No matrix is given fewer than bits − floor_gap true bits (None: no floor). The budget then cannot buy a few
    # matrices' precision by pushing others far below the average, where the error model is least reliable.
    floor_gap: float | None = None
    group_choice: str = "budget"  # "graph": G from the kNN graph (SPEC §2.2), the budget only sets ρ
    price_rho: bool = True  # the ρ search minimises error + price·bytes; False: error alone (the paper)
    # Refine each matrix's ρ by Brent between its grid neighbours (at the budget's price). Off: ρ stays at the grid
    # point the budget chose, so the achieved bits are the planned ones exactly.
    refine_rho: bool = False
    compensate: bool = True  # GPTQ-style compensation with the chosen codebook
    # ... only for matrices whose calibration has at least this many tokens per input column: below, XᵀX is (near)
    # rank-deficient and the error feedback fits the calibration tokens rather than the model (0: every matrix).
    # Chosen on dev data (benchmarks/screen_v2_*.md): with 4,096 tokens, compensating Qwen2.5-1.5B's K = 1,536
    # matrices at 2.7 tokens per column made its dev code text worse. The default 8,192 tokens compensate every
    # SmolLM2 matrix and Qwen's K = 1,536 ones (5.3 per column), not its K = 8,960 down_proj.
    compensate_min_tokens_per_column: float = 4.0
    act_order: bool = True  # ... handling columns by decreasing h first
    # ... with H's off-diagonal entries scaled by 1 − compensate_shrink: the cross-correlations are what a few
    # thousand tokens sample worst; 1 feeds no error forward (nearest rounding in the same codebook). Screened on
    # Qwen2.5-Coder's dev texts at 0.5 (docs/sage_v2.md): wiki worse, code better, a trade; so 0.
    compensate_shrink: float = 0.0
    # ... or, per matrix, each of these shrink values, keeping the one whose result has the lowest output error
    # tr(ΔW·H_v·ΔWᵀ) on validation tokens that XᵀX never saw (1: the uncompensated result). A ridge chosen by
    # held-out error, since how far the feedback may trust a few tokens per column differs by matrix and by model.
    # Needs validation rows (pipeline/calibration.py: validation_tokens). Empty: compensate_shrink alone. Screened at
    # [0, 0.5, 1] (docs/sage_v2.md): better on both of SmolLM2-135M's dev texts at 3.2 bits, a trade at 4.2 bits and
    # on Qwen2.5-Coder-1.5B; so opt-in (--compensate-candidates).
    compensate_candidates: tuple[float, ...] = ()
    # ... with each block's XᵀX from inputs that ran through the already-quantized blocks before it (GPTQ's
    # order), not from the unquantized model's kept inputs: later blocks then also answer earlier blocks' errors.
    # Worse on both of Qwen2.5-Coder's dev texts (docs/sage_v2.md), so off.
    sequential_inputs: bool = False
    # After compensation, re-fit α and the salient scales to the codes it chose (quant/refit.py: once the codes are
    # fixed, the output error is a quadratic in the scales with a closed-form minimum), this many times, compensating
    # again with the re-fitted codebook between two re-fits (0: off). Same bytes, same op; each round after the
    # first costs one more compensation.
    refit_rounds: int = 0
    # Options are measured on this fraction of each matrix's rows (at least option_min_rows): see sage_options;
    # and their band centres stop once no centre moves more than option_lloyd_tol × the largest. Measured on a
    # SmolLM2 q_proj: 1e-3 instead of 1e-4 halves the measuring time and changes errors by under 3 %.
    option_rows: float = 1.0
    option_min_rows: int = 256
    option_lloyd_tol: float = 1e-3

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "SageRecipe":
        """The recipe with these fields over the defaults, where a power given alone, or no activation weighting,
        also empties the default activation_power_candidates: asking for one power means that power."""
        fields = dict(fields)
        if "activation_power_candidates" not in fields and ("activation_power" in fields
                                                             or fields.get("activation_weighting") is False):
            fields["activation_power_candidates"] = ()
        return cls(**fields)

    @property
    def needs_calibration(self) -> bool:
        return self.activation_weighting or self.layer_sensitivity or self.compensate

    @property
    def validates_compensation(self) -> bool:
        """Whether finishing needs validation rows (compensate_candidates)."""
        return self.compensate and bool(self.compensate_candidates)

    @property
    def needs_validation(self) -> bool:
        """Whether the run needs validation rows: to judge the compensation or to choose the activation power."""
        return self.validates_compensation or bool(self.activation_power_candidates)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def validate(self) -> None:
        if not _is_number(self.bits) or not 0 < self.bits <= 32:
            raise ValueError(f"SAGE recipe: bits must be a number in (0, 32], got {self.bits!r}")
        groups = self.group_options
        if not groups or not all(_is_int(g) and 1 <= g <= MAX_GROUPS for g in groups):
            raise ValueError(f"SAGE recipe: group_options must be integers in 1..{MAX_GROUPS}, got {groups!r}")
        grid = self.rho_grid
        if not grid or not all(_is_number(r) and 0 <= r < 1 for r in grid) or len(set(grid)) != len(grid):
            raise ValueError(f"SAGE recipe: rho_grid must be distinct numbers in [0, 1), got {grid!r}")
        if not _is_number(self.option_rows) or not 0 < self.option_rows <= 1:
            raise ValueError(f"SAGE recipe: option_rows must be in (0, 1], got {self.option_rows!r}")
        if not _is_number(self.sensitivity_power) or not 0 <= self.sensitivity_power <= 2:
            raise ValueError(f"SAGE recipe: sensitivity_power must be in [0, 2], got {self.sensitivity_power!r}")
        if not _is_number(self.activation_power) or not 0 <= self.activation_power <= 2:
            raise ValueError(f"SAGE recipe: activation_power must be in [0, 2], got {self.activation_power!r}")
        powers = self.activation_power_candidates
        if not all(_is_number(a) and 0 <= a <= 2 for a in powers) or len(set(powers)) != len(powers):
            raise ValueError("SAGE recipe: activation_power_candidates must be distinct numbers in [0, 2], "
                             f"got {powers!r}")
        if self.activation_power_bits is not None and not (_is_number(self.activation_power_bits)
                                                            and 0 < self.activation_power_bits <= 32):
            raise ValueError("SAGE recipe: activation_power_bits must be a number in (0, 32] or null, got "
                             f"{self.activation_power_bits!r}")
        if powers and not self.activation_weighting:
            raise ValueError("SAGE recipe: activation_power_candidates needs activation weighting")
        if self.floor_gap is not None and (not _is_number(self.floor_gap) or not self.floor_gap >= 0):
            raise ValueError(f"SAGE recipe: floor_gap must be a number >= 0 or null, got {self.floor_gap!r}")
        if not _is_number(self.compensate_min_tokens_per_column) or self.compensate_min_tokens_per_column < 0:
            raise ValueError("SAGE recipe: compensate_min_tokens_per_column must be a number >= 0, got "
                             f"{self.compensate_min_tokens_per_column!r}")
        if not _is_number(self.compensate_shrink) or not 0 <= self.compensate_shrink <= 1:
            raise ValueError(f"SAGE recipe: compensate_shrink must be in [0, 1], got {self.compensate_shrink!r}")
        cands = self.compensate_candidates
        if not all(_is_number(c) and 0 <= c <= 1 for c in cands) or len(set(cands)) != len(cands):
            raise ValueError(f"SAGE recipe: compensate_candidates must be distinct numbers in [0, 1], got {cands!r}")
        if not _is_number(self.option_lloyd_tol) or not 0 <= self.option_lloyd_tol < 1:
            raise ValueError(f"SAGE recipe: option_lloyd_tol must be in [0, 1), got {self.option_lloyd_tol!r}")
        if not _is_int(self.option_min_rows) or self.option_min_rows < 1:
            raise ValueError(f"SAGE recipe: option_min_rows must be an integer >= 1, got {self.option_min_rows!r}")
        if not _is_int(self.refit_rounds) or self.refit_rounds < 0:
            raise ValueError(f"SAGE recipe: refit_rounds must be an integer >= 0, got {self.refit_rounds!r}")
        if self.group_choice not in GROUP_CHOICES:
            raise ValueError(f"SAGE recipe: group_choice must be one of {', '.join(GROUP_CHOICES)}, "
                             f"got {self.group_choice!r}")
        for name in ("activation_weighting", "layer_sensitivity", "price_rho", "refine_rho", "compensate",
                     "act_order", "sequential_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SAGE recipe: {name} must be true or false, got {getattr(self, name)!r}")


# Per-matrix settings of the v2 preset: 8-bit salient values cost the same int8 as 4-bit ones; Lloyd runs until
# no centre moves by more than 1e-4 of the largest; the graph step only proposes G (for the report and the
# ablation), on 2,000 samples with 4 k-means restarts, which costs a third of SPEC §2's 5,000 and 10.
V2_MATRIX = SageConfig(salient_bits=8, lloyd_steps=100, lloyd_tol=1e-4, rho_bounds=(0.0, 0.05), graph_samples=2000,
                       kmeans_n_init=4)

# "v2" (the default): SageRecipe + V2_MATRIX, activation-aware and budgeted (SPEC §2.1).
# "paper": SageConfig() alone, SPEC §2 read literally, data-free.
PRESETS = ("v2", "paper")
RECIPE_FIELDS = frozenset(f.name for f in fields(SageRecipe))

"""SAGE-PTQ v2 over a whole model (SPEC §2.1): the default preset.

1. Calibration statistics from the unquantized model (layer_stats.py): each Linear's input energy h and its
   loss sensitivity s, so that errors are weighted the way the model feels them.
2. Options: every matrix is measured at each G of the recipe and each ρ of its grid (weighted error, exact
   stored bytes); the kNN graph's proposed G is recorded next to them. With activation_power_candidates this runs
   once per column-weight power, and the power whose uncompensated allocation scores best on validation rows stays.
3. Budget: one price per stored byte is found at which the matrices' cheapest options (error + price·bytes)
   meet the target true bits (quant/budget.py).
4. Per matrix, the Brent search refines ρ between the chosen grid point's neighbours, minimising
   error + price·bytes: the same price, so the model stays on budget.
5. Compensation (optional): block by block, GPTQ re-chooses each stored value of that codebook under the layer's
   XᵀX, from the unquantized model's inputs kept by step 1. Stored sizes do not change.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from ..materialize import apply_dequantized, dense_weight, install_packed
from ..models import LoadedModel, quantizable_linears
from ..format.sage_layout import stored_bytes
from ..quant.budget import Allocation, BudgetError, Option, allocate, floored, neighbours
from ..quant.compensate import compensate_sage, compensate_validated
from ..quant.refit import refit_compensated
from ..quant.config import V2_MATRIX, SageConfig, SageRecipe
from ..quant.sage import quantize_sage, sage_options
from .guard import decoded_while_running, mean_nll
from .layer_stats import LayerStats, block_hessians, block_outputs, collect_layer_stats
from .workers import MatrixPool


@dataclass
class BudgetPlan:
    """What the budget decided, before any matrix is finally quantized."""

    allocation: Allocation
    names: list[str]
    weights: dict[str, np.ndarray | None]  # column weights per matrix (None: data-free)
    seeds: dict[str, int]
    graph_groups: dict[str, object]  # GroupChoice per matrix

    def option(self, name: str) -> Option:
        return self.allocation.choices[self.names.index(name)]


def group_counts(recipe: SageRecipe, cfg: SageConfig) -> tuple[int, ...]:
    """The G a matrix can get: the kNN graph's candidates with --graph-groups, else the budget's options."""
    return cfg.group_candidates if recipe.group_choice == "graph" else recipe.group_options


def budget_range(loaded: LoadedModel, recipe: SageRecipe, cfg: SageConfig) -> tuple[float, float]:
    """The fewest and the most true bits this model's matrices can be stored in under the recipe, from shapes alone:
    every matrix at its smallest G with no salient entries, and at its largest G with the largest ρ of the grid.
    With G from the kNN graph, the smallest G is the graph's smallest candidate."""
    linears = quantizable_linears(loaded.model, loaded.architecture)
    groups = group_counts(recipe, cfg)
    g_min, g_max = min(groups), max(groups)
    rho_max = max(recipe.rho_grid)
    shapes = [tuple(linear.weight.shape) for linear in linears.values()]
    n_weights = sum(n * k for n, k in shapes)
    rows = cfg.row_multipliers
    low = sum(stored_bytes(n, k, g_min, 0, rows) for n, k in shapes)
    high = sum(stored_bytes(n, k, g_max, int(round(rho_max * n * k)), rows) for n, k in shapes)
    return 8 * low / n_weights, 8 * high / n_weights


def check_budget(loaded: LoadedModel, recipe: SageRecipe, cfg: SageConfig = V2_MATRIX) -> str | None:
    """Before any long work: BudgetError when the budget is below the fewest bits any choice can store; a one-line
    note (returned) when it is above the most the options can use, which the result then stays below."""
    low, high = budget_range(loaded, recipe, cfg)
    if recipe.bits < low:
        raise BudgetError(f"a budget of {recipe.bits:g} bits per weight is below the smallest this model's layers "
                          f"can be stored in ({low:.3f} true bits with G={min(group_counts(recipe, cfg))} and no "
                          "salient weights)")
    if recipe.bits > high:
        return (f"note: a budget of {recipe.bits:g} bits per weight is above the most SAGE's options store for this "
                f"model (about {high:.3f} true bits); the result will use less")
    return None


def _measure(item: tuple) -> tuple[list[Option], object]:
    """Worker: one matrix's options and the graph's proposed G, both on the recipe's share of its rows."""
    w, cfg, recipe, seed, col_weight = item
    rows = min(w.shape[0], max(recipe.option_min_rows, int(np.ceil(recipe.option_rows * w.shape[0]))))
    cfg = replace(cfg, lloyd_tol=max(cfg.lloyd_tol, recipe.option_lloyd_tol))
    if recipe.group_choice == "graph":
        _, proposal = sage_options(w, cfg, (), (), seed, col_weight, propose=True, rows=rows)
        options, _ = sage_options(w, cfg, (proposal.n_groups,), recipe.rho_grid, seed, col_weight, rows=rows)
        return options, proposal
    return sage_options(w, cfg, recipe.group_options, recipe.rho_grid, seed, col_weight, propose=True, rows=rows)


@dataclass
class Measurements:
    """Steps 1 and 2: everything the budget is solved from. It does not depend on the budget itself, so one
    measurement can be finished at several budgets (tools/bench_quality.py does, on copies of the model)."""

    stats: LayerStats | None
    names: list[str]
    tables: list[list[Option]]  # per matrix, in the order of names
    weights: dict[str, np.ndarray | None]  # column weights per matrix (None: data-free)
    graph_groups: dict[str, object]  # GroupChoice per matrix
    n_weights: int
    timings: dict
    sizes: list[int] | None = None  # weights per matrix, in the order of names
    power_choice: dict | None = None  # recipe.activation_power_candidates: each power's validation score


def measure_v2(loaded: LoadedModel, recipe: SageRecipe, cfg: SageConfig, seeds: dict[str, int],
               calib: torch.Tensor | None, pool: MatrixPool, progress: bool = True,
               validation: torch.Tensor | None = None) -> Measurements:
    """Steps 1 and 2 on the unquantized model: calibration statistics, then every matrix's options (at the
    activation power that validation rows choose, with recipe.activation_power_candidates).
    validation: rows kept out of the statistics, for the candidates of the recipe."""
    start = time.perf_counter()
    stats = None
    if recipe.needs_validation and validation is None:
        raise ValueError("compensate_candidates and activation_power_candidates need validation rows")
    if recipe.needs_calibration:
        stats = collect_layer_stats(loaded.model, loaded.architecture, calib, recipe.layer_sensitivity,
                                    keep_inputs=recipe.compensate, progress=progress,
                                    block_weights=loaded.block_weights,
                                    validation=validation if recipe.compensate else None)
        if not (recipe.activation_weighting or recipe.layer_sensitivity):
            stats.input_energy, stats.sensitivity = {}, None  # compensation only: no weighting anywhere else
    timings = {"statistics_s": round(time.perf_counter() - start, 1)}
    return measure_options(loaded, recipe, cfg, seeds, stats, pool, progress, timings, validation)


def choose_activation_power(loaded: LoadedModel, recipe: SageRecipe, cfg: SageConfig, seeds: dict[str, int],
                            stats: LayerStats, pool: MatrixPool, validation: torch.Tensor, progress: bool = True,
                            timings: dict | None = None) -> Measurements:
    """The options at each of recipe.activation_power_candidates, and the measurements of the power whose
    allocation at comparison_bits, built without compensation (which does not depend on the power), gives the
    model the lowest mean loss on the validation rows. Those rows are in no statistic, and the guard's rows are
    not them."""
    timings = dict(timings or {})
    start = time.perf_counter()
    scored = []
    budget = None
    for power in recipe.activation_power_candidates:
        measured = measure_options(loaded, replace(recipe, activation_power=power, activation_power_candidates=()),
                                   cfg, seeds, stats, pool, progress)
        budget = budget or comparison_bits(recipe, measured)
        trial = replace(recipe, activation_power=power, activation_power_candidates=(), bits=budget)
        scored.append((validation_nll(loaded, trial, cfg, seeds, measured, pool, validation, progress), measured))
    best = min(range(len(scored)), key=lambda i: scored[i][0])  # ties: the first candidate
    measurements = scored[best][1]
    timings["activation_power_choice_s"] = round(time.perf_counter() - start, 1)
    measurements.timings = {**timings, "options_s": measurements.timings["options_s"]}
    measurements.power_choice = {
        "chosen": recipe.activation_power_candidates[best],
        "budget_bits": budget,  # the trial allocations' budget
        "candidates": [{"activation_power": power, "validation_ppl": math.exp(nll)}
                       for power, (nll, _) in zip(recipe.activation_power_candidates, scored)],
        "validation_rows": int(validation.shape[0]),
        "tokens_scored": int(validation.shape[0] * (validation.shape[1] - 1)),
    }
    return measurements


def comparison_bits(recipe: SageRecipe, measurements: Measurements) -> float:
    """The budget the activation powers are compared at: recipe.activation_power_bits, or the least these
    options can store where that is more (a recipe of large G only); the run's own budget where it is None.
    Either way, with a reference the choice does not depend on the run's budget."""
    reference = recipe.activation_power_bits
    if reference is None:
        return recipe.bits
    smallest = 8 * sum(min(o.nbytes for o in table) for table in measurements.tables) / measurements.n_weights
    return max(reference, smallest)


def validation_nll(loaded: LoadedModel, recipe: SageRecipe, cfg: SageConfig, seeds: dict[str, int],
                   measurements: Measurements, pool: MatrixPool, validation: torch.Tensor,
                   progress: bool = True) -> float:
    """Mean next-token loss on the validation rows of the model with every matrix at the budget's choice from
    these measurements, uncompensated; the model itself is left as it was."""
    plan = plan_budget(measurements, seeds, recipe.bits, recipe.floor_gap)
    items = (_finish_item(plan, recipe, cfg, name, loaded.weight(name), None) for name in measurements.names)
    built = dict(zip(measurements.names, tqdm(pool.map(_finish, items), total=len(measurements.names),
                                              desc=f"quantize: trying a={recipe.activation_power:g}", unit="layer",
                                              disable=not progress)))
    with loaded.running_weights(), decoded_while_running(loaded, lambda name, _w: _decoded(built.get(name))):
        return mean_nll(loaded.model, validation)


def _decoded(result) -> np.ndarray | None:
    return None if result is None else dense_weight(result)


def measure_options(loaded: LoadedModel, recipe: SageRecipe, cfg: SageConfig, seeds: dict[str, int],
                    stats: LayerStats | None, pool: MatrixPool, progress: bool = True,
                    timings: dict | None = None, validation: torch.Tensor | None = None) -> Measurements:
    """Step 2 alone: every matrix's options under the recipe's column weights, from statistics already taken
    (with recipe.activation_power_candidates, those of the power the validation rows choose)."""
    if recipe.activation_power_candidates:
        return choose_activation_power(loaded, recipe, cfg, seeds, stats, pool, validation, progress, timings)
    timings = dict(timings or {})
    start = time.perf_counter()
    linears = quantizable_linears(loaded.model, loaded.architecture)
    weighted = stats is not None and (recipe.activation_weighting or recipe.layer_sensitivity)
    weights = {name: stats.column_weights(name, recipe.activation_weighting, recipe.layer_sensitivity,
                                          recipe.sensitivity_power, recipe.activation_power)
               if weighted else None for name in linears}
    items = ((loaded.weight(name), cfg, recipe, seeds[name], weights[name]) for name in linears)
    measured = list(tqdm(pool.map(_measure, items), total=len(linears), desc="quantize: measuring options",
                         unit="layer", disable=not progress))
    timings["options_s"] = round(time.perf_counter() - start, 1)
    return Measurements(stats, list(linears), [options for options, _ in measured], weights,
                        {name: proposal for name, (_, proposal) in zip(linears, measured)},
                        sum(linear.weight.numel() for linear in linears.values()), timings,
                        [linear.weight.numel() for linear in linears.values()])


def plan_budget(measurements: Measurements, seeds: dict, bits: float, floor_gap: float | None = None) -> BudgetPlan:
    """Step 3: one option per matrix under the bit budget; with floor_gap, none below bits − floor_gap true bits
    (when the options allow it: otherwise without the floor)."""
    tables = measurements.tables
    allocation = None
    if floor_gap is not None:
        try:
            allocation = allocate(floored(tables, measurements.sizes, bits - floor_gap), measurements.n_weights, bits)
        except BudgetError:  # the floor leaves no choice that fits: allocate without it
            pass
    if allocation is None:
        allocation = allocate(tables, measurements.n_weights, bits)
    return BudgetPlan(allocation, measurements.names, measurements.weights, seeds, measurements.graph_groups)


def search_config(cfg: SageConfig, recipe: SageRecipe, option: Option, price: float) -> SageConfig:
    """Step 4's configuration for one matrix: G as chosen; ρ searched between the grid neighbours of the chosen
    ρ at the budget's price (or, without a price, over the whole ρ interval on error alone, as the paper does)."""
    if not recipe.price_rho:
        return replace(cfg, fixed_groups=option.n_groups, rho_price=0.0)
    if not recipe.refine_rho:
        return replace(cfg, fixed_groups=option.n_groups, fixed_rho=option.rho)
    lo, hi = neighbours(recipe.rho_grid, option.rho)
    if lo == hi:
        return replace(cfg, fixed_groups=option.n_groups, fixed_rho=option.rho)
    return replace(cfg, fixed_groups=option.n_groups, rho_bounds=(lo, hi), rho_init=option.rho, rho_price=price,
                   brent_xatol=(hi - lo) / 32)


def compensated(recipe: SageRecipe, stats: LayerStats | None, in_features: int) -> bool:
    """Whether step 5 runs for a matrix: enough calibration tokens per input column for XᵀX to be trusted."""
    return (recipe.compensate and stats is not None
            and stats.tokens >= recipe.compensate_min_tokens_per_column * in_features)


def _finish(item: tuple):
    """Worker: step 4 (and 5 when a Hessian is given) for one matrix."""
    w, cfg, seed, col_weight, proposal, option, price, hessian, act_order, shrink, validation, refit = item
    result = quantize_sage(w, cfg, seed, col_weight, proposal=proposal)
    result.stats.update(budget_groups=option.n_groups, budget_rho=option.rho, budget_price=price)
    if hessian is not None and validation is not None:
        h_val, shrinks = validation
        result = compensate_validated(w, hessian, h_val, result, shrinks, act_order=act_order)
    elif hessian is not None:
        result = compensate_sage(w, hessian, result, act_order=act_order, shrink=shrink)
    if hessian is not None and refit and result.stats.get("compensated"):
        result = refit_compensated(w, hessian, result, refit, act_order=act_order)
    return result.compact()  # the packed tensors only: 10x less to send back and to hold until export


def _finish_item(plan: BudgetPlan, recipe: SageRecipe, cfg: SageConfig, name: str, w: np.ndarray,
                 hessian: np.ndarray | None, validation_hessian: np.ndarray | None = None) -> tuple:
    option, price = plan.option(name), plan.allocation.price
    validation = (None if validation_hessian is None or hessian is None
                  else (validation_hessian, tuple(recipe.compensate_candidates)))
    return (w, search_config(cfg, recipe, option, price), plan.seeds[name], plan.weights[name],
            plan.graph_groups[name], option, price, hessian, recipe.act_order,
            recipe.compensate_shrink, validation, recipe.refit_rounds)


def quantize_v2(loaded: LoadedModel, recipe: SageRecipe, cfg: SageConfig, seeds: dict[str, int],
                calib: torch.Tensor | None, pool: MatrixPool, progress: bool = True,
                validation: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Quantize every declared Linear in place under the recipe's budget. Returns ({name: SageResult}, summary
    for reports: budget, price, planned and achieved bits, timings)."""
    measurements = measure_v2(loaded, recipe, cfg, seeds, calib, pool, progress, validation)
    return finish_v2(loaded, recipe, cfg, seeds, measurements, pool, progress)


def effective_recipe(recipe: SageRecipe, measurements: Measurements) -> dict:
    """The recipe as it ran: with the activation power the validation rows chose, where they chose one."""
    ran = recipe.to_dict()
    if measurements.power_choice:
        ran["activation_power"] = measurements.power_choice["chosen"]
    return ran


def finish_v2(loaded: LoadedModel, recipe: SageRecipe, cfg: SageConfig, seeds: dict[str, int],
              measurements: Measurements, pool: MatrixPool, progress: bool = True,
              keep_measurements: bool = False) -> tuple[dict, dict]:
    """Steps 3 to 5 at recipe.bits, in place on loaded.model (which must still be the unquantized model the
    measurements were taken on)."""
    timings = dict(measurements.timings)
    start = time.perf_counter()
    plan = plan_budget(measurements, seeds, recipe.bits, recipe.floor_gap)
    stats = measurements.stats
    linears = quantizable_linears(loaded.model, loaded.architecture)

    blocks = loaded.architecture.blocks
    n_blocks = len(loaded.model.get_submodule(blocks))
    sequential = recipe.compensate and recipe.sequential_inputs and stats is not None
    validating = recipe.validates_compensation and stats is not None
    if validating and stats.validation_inputs is None:
        raise ValueError("compensate_candidates needs statistics collected with validation rows")

    names = [[n for n in linears if n.startswith(f"{blocks}.{i}.")] for i in range(n_blocks)]

    def block_items(i: int, inputs: list[torch.Tensor] | None):
        # One block's Hessians at a time, only of the matrices the gate compensates (Qwen2.5-Coder-1.5B's
        # K = 8,960 down_proj would cost 8,960² per token for nothing); inputs None: the kept unquantized inputs.
        gated = tuple(lin for lin in loaded.architecture.linears
                      if compensated(recipe, stats, linears[f"{blocks}.{i}.{lin}"].in_features))
        hessians = block_hessians(loaded.model, loaded.architecture, stats, i, loaded.block_weights, inputs,
                                  linears=gated)
        # The validation rows' XᵀX, always through the unquantized blocks (as kept), with sequential_inputs too.
        held = (block_hessians(loaded.model, loaded.architecture, stats, i, loaded.block_weights, validation=True,
                               linears=gated) if validating else {})
        for name in names[i]:
            yield _finish_item(plan, recipe, cfg, name, loaded.weight(name), hessians.get(name), held.get(name))

    def finished():
        """(name, result), block by block."""
        if not sequential:  # every block from kept inputs: blocks overlap in the pool
            yield from zip((n for block in names for n in block),
                           pool.map(_finish, (it for i in range(n_blocks) for it in block_items(i, None))))
            return
        # GPTQ's usual order: block i's Hessians from inputs that ran through the quantized blocks before it, so
        # its compensation also answers their errors. Each block waits for the one before it.
        inputs = stats.block_inputs[0]
        for i in range(n_blocks):
            done = list(zip(names[i], pool.map(_finish, block_items(i, inputs))))
            yield from done  # installed by the caller (streamed) before this generator resumes
            if not loaded.streamed:
                apply_dequantized(loaded.model, dict(done))  # already in place when the loop below ends
            if i + 1 < n_blocks:
                inputs = block_outputs(loaded.model, loaded.architecture, stats, i, inputs, loaded.block_weights)

    desc = "quantize: ρ search + compensation" if recipe.compensate else "quantize: ρ search"
    results = {}
    for name, result in tqdm(finished(), total=len(linears), desc=desc, unit="layer", disable=not progress):
        results[name] = result
        if loaded.streamed:
            # Packed as it arrives. Without sequential_inputs, block i+1's Hessians were taken before its first
            # result came back, so the blocks still to be finished run unquantized, as in memory.
            install_packed(loaded.model, name, result)
    if not loaded.streamed and not sequential:
        apply_dequantized(loaded.model, results)
    if stats is not None and not keep_measurements:
        stats.block_inputs = stats.validation_inputs = None  # free the kept activations
    timings["quantize_s"] = round(time.perf_counter() - start, 1)

    for name, result in results.items():
        if stats is not None and stats.sensitivity is not None:
            result.stats["sensitivity"] = stats.sensitivity[name]
    n_bytes = sum(int(r.stats["stored_bytes"]) for r in results.values())
    summary = {
        "preset": "v2",
        "budget_bits": recipe.bits,
        "planned_bits": plan.allocation.true_bits,
        "true_bits": 8 * n_bytes / plan.allocation.n_weights,
        "price": plan.allocation.price,
        "recipe": effective_recipe(recipe, measurements),
        "statistics_tokens": None if stats is None else stats.tokens,
        **({"activation_power_choice": measurements.power_choice} if measurements.power_choice else {}),
        "timings": timings,
    }
    return results, summary

"""The bit budget (quant/budget.py): choices fit the target, land close to it, and are the cheapest at their price."""

import itertools

import pytest

from sage_export.quant.budget import BudgetError, Option, allocate, cheapest, fill, floored, neighbours
from sage_export.quant.config import SageRecipe


def table(seed: int, n_weights: int = 1000) -> list[Option]:
    """Options of one matrix: more groups and more salient entries cost bytes and remove error, with diminishing
    returns, as measured tables do."""
    out = []
    for g, rho in itertools.product((1, 2, 4, 8), (0.0, 0.01, 0.02, 0.05)):
        nbytes = int(n_weights * (1 + (g.bit_length() - 1)) / 8 + rho * n_weights * 3 + 10)
        error = (1.0 + seed) / (g ** 1.5) * (1 - 8 * rho) + 0.01 * seed
        out.append(Option(g, rho, int(rho * n_weights), error, nbytes))
    return out


TABLES = [table(s) for s in range(6)]
N_WEIGHTS = 6 * 1000


def bits(choices) -> float:
    return 8 * sum(o.nbytes for o in choices) / N_WEIGHTS


@pytest.mark.parametrize("target", [1.2, 2.0, 2.5, 3.3, 4.1])
def test_choices_fit_and_land_close(target):
    alloc = allocate(TABLES, N_WEIGHTS, target)
    assert alloc.true_bits <= target + 1e-12
    # Nothing left unspent that some single upgrade could still have bought.
    slack = target * N_WEIGHTS / 8 - alloc.nbytes
    for t, chosen in zip(TABLES, alloc.choices):
        assert not any(0 < o.nbytes - chosen.nbytes <= slack and o.error < chosen.error for o in t)


def test_lower_budget_never_has_lower_error():
    errors = [allocate(TABLES, N_WEIGHTS, b).error for b in (1.5, 2.0, 2.5, 3.0, 4.0)]
    assert errors == sorted(errors, reverse=True)


def test_budget_close_to_the_best_possible_on_a_small_problem():
    small = [table(s)[::3] for s in range(3)]  # brute force over 6^3 assignments
    target, n = 2.4, 3000
    alloc = allocate(small, n, target)
    best = min(sum(o.error for o in combo) for combo in itertools.product(*small)
               if 8 * sum(o.nbytes for o in combo) / n <= target)
    assert alloc.error <= best * 1.10


def test_generous_budget_takes_the_least_error():
    alloc = allocate(TABLES, N_WEIGHTS, 32)
    assert alloc.price == 0.0
    assert all(o.error == min(x.error for x in t) for o, t in zip(alloc.choices, TABLES))


def test_budget_below_every_choice_is_an_error():
    with pytest.raises(BudgetError, match="below the smallest choice"):
        allocate(TABLES, N_WEIGHTS, 0.5)


def test_cheapest_breaks_ties_towards_fewer_bytes():
    a, b = Option(2, 0.0, 0, 1.0, 100), Option(4, 0.0, 0, 0.5, 150)
    assert cheapest([a, b], 0.01) == a  # 1.0 + 1.0 = 2.0 vs 0.5 + 1.5 = 2.0: tie, fewer bytes wins
    assert cheapest([a, b], 0.001) == b


def test_fill_spends_slack_on_the_best_gain_per_byte():
    t1 = [Option(1, 0.0, 0, 10.0, 100), Option(2, 0.0, 0, 5.0, 150)]  # 0.1 error per byte
    t2 = [Option(1, 0.0, 0, 10.0, 100), Option(2, 0.0, 0, 8.0, 110)]  # 0.2 error per byte
    start = allocate([t1, t2], 1600, 1.0)  # 200 bytes: both at their smallest
    assert start.nbytes == 200
    # t2's upgrade first (more per byte); t1's +50 then fits in 60 bytes of slack but not in 55.
    assert fill(start, [t1, t2], 255).choices == (t1[0], t2[1])
    assert fill(start, [t1, t2], 260).choices == (t1[1], t2[1])


def test_neighbours_bracket_a_grid_value():
    grid = (0.0, 0.001, 0.01, 0.05)
    assert neighbours(grid, 0.01) == (0.001, 0.05)
    assert neighbours(grid, 0.0) == (0.0, 0.001)
    assert neighbours(grid, 0.05) == (0.01, 0.05)


@pytest.mark.parametrize("min_bits", [1.5, 2.2, 3.0])
def test_floored_tables_keep_no_option_below_the_floor(min_bits):
    sizes = [1000] * len(TABLES)
    kept = floored(TABLES, sizes, min_bits)
    for table_, full in zip(kept, TABLES):
        assert table_ and set(table_) <= set(full)
        assert all(8 * o.nbytes >= min_bits * 1000 for o in table_)
        assert len(table_) == sum(8 * o.nbytes >= min_bits * 1000 for o in full)
    a = allocate(kept, N_WEIGHTS, 3.3)
    assert min(8 * o.nbytes / 1000 for o in a.choices) >= min_bits and a.true_bits <= 3.3


def test_a_floor_above_every_option_keeps_the_largest():
    kept = floored(TABLES, [1000] * len(TABLES), 100.0)
    assert [t for t in kept] == [[max(t, key=lambda o: (o.nbytes, -o.error))] for t in TABLES]


@pytest.mark.parametrize("field,value", [("sensitivity_power", -0.1), ("sensitivity_power", 3),
                                         ("activation_power", -0.5), ("floor_gap", -1), ("floor_gap", "x"),
                                         ("refine_rho", 1), ("activation_power_candidates", (0.5, 0.5)),
                                         ("activation_power_candidates", (3.0,)),
                                         ("compensate_candidates", (0.0, 2.0))])
def test_recipe_refuses_bad_new_fields(field, value):
    from dataclasses import replace

    with pytest.raises(ValueError, match=field):
        replace(SageRecipe(), **{field: value}).validate()

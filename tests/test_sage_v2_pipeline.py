"""The v2 preset over a whole (tiny) model: self-sampled calibration repeats, the statistics are what they claim,
and a budget of B true bits lands within ±0.02 of B with every stored byte counted."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from sage_export.models import load_model, quantizable_linears
from sage_export.pipeline import calibration
from sage_export.pipeline.calibration import calibration_tokens, prompt_rows, sample_ids
from sage_export.pipeline.layer_stats import block_hessians, collect_layer_stats
from sage_export.pipeline.methods import Method
from sage_export.pipeline.quantize import QuantizedModel, layer_seeds
from sage_export.pipeline.sage_v2 import finish_v2, measure_v2
from sage_export.pipeline.workers import MatrixPool
from sage_export.report.build import bits_summary, layer_rows


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def test_self_sampled_calibration_repeats_and_depends_on_the_seed(loaded):
    a = sample_ids(loaded.model, loaded.tokenizer, 3, 24, seed=5, progress=False)
    b = sample_ids(loaded.model, loaded.tokenizer, 3, 24, seed=5, progress=False)
    c = sample_ids(loaded.model, loaded.tokenizer, 3, 24, seed=6, progress=False)
    assert a.shape == (3, 24) and torch.equal(a, b) and not torch.equal(a, c)
    ids, info = calibration_tokens(loaded, None, 3, 24, seed=5, progress=False)
    assert torch.equal(ids, a) and info["source"] == "self-generated" and info["tokens"] == 72
    assert "prompts" in info["sampling"] and info["start"] == "prompts"


def test_prompted_rows_hold_only_sampled_text_and_bos_rows_start_with_bos(loaded):
    tok = loaded.tokenizer
    prompted = sample_ids(loaded.model, tok, 4, 24, seed=1, progress=False)
    special = torch.tensor(sorted(set(tok.all_special_ids) | {tok.bos_token_id}))
    assert prompted.shape == (4, 24) and not torch.isin(prompted, special).any()  # never ends or restarts a row
    bos = sample_ids(loaded.model, tok, 4, 24, seed=1, progress=False, prompted=False)
    assert bos.shape == (4, 24) and (bos[:, 0] == tok.bos_token_id).all()
    _, info = calibration_tokens(loaded, None, 2, 8, seed=1, progress=False, prompted=False)
    assert "from BOS" in info["sampling"] and info["start"] == "bos"


def test_left_padded_prompts_sample_what_each_prompt_samples_alone(loaded):
    """Rows of different prompt lengths share one batch by left padding; the padding must not leak into any row.
    At a tiny temperature sampling is greedy, so each row must match the row sampled on its own."""
    tok = loaded.tokenizer
    rows = prompt_rows(tok, 2)
    assert len(rows[0]) != len(rows[1])
    both = sample_ids(loaded.model, tok, 2, 12, seed=0, progress=False, temperature=1e-4)
    first = sample_ids(loaded.model, tok, 1, 12, seed=0, progress=False, temperature=1e-4)
    assert torch.equal(both[:1], first)
    with pytest.MonkeyPatch.context() as mp:  # row 1 alone: make its prompt the first
        mp.setattr(calibration, "CALIB_PROMPTS", calibration.CALIB_PROMPTS[1:])
        second = sample_ids(loaded.model, tok, 1, 12, seed=0, progress=False, temperature=1e-4)
    assert torch.equal(both[1:], second)


def test_prompts_use_the_chat_template_where_the_tokenizer_has_one(loaded):
    tok = loaded.tokenizer
    plain = prompt_rows(tok, 1)[0]
    assert plain[0] == tok.bos_token_id and tok.decode(plain[1:]) == calibration.CALIB_PROMPTS[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tok, "chat_template", "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}"
                                         "{% endfor %}{% if add_generation_prompt %} [assistant]{% endif %}")
        templated = tok.decode(prompt_rows(tok, 1)[0])
    assert "[user]" in templated and templated.endswith("[assistant]") and calibration.CALIB_PROMPTS[0] in templated


def test_input_energy_is_the_mean_squared_input(loaded):
    ids, _ = calibration_tokens(loaded, None, 2, 16, seed=0, progress=False)
    stats = collect_layer_stats(loaded.model, loaded.architecture, ids, sensitivity=True, progress=False)
    captured = {}
    mlp = loaded.model.model.layers[1].mlp

    def grab(module, inputs, output):
        captured["x"] = inputs[0].detach()

    handle = mlp.down_proj.register_forward_hook(grab)
    try:
        with torch.no_grad():
            loaded.model(ids)
    finally:
        handle.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).double()
    np.testing.assert_allclose(stats.input_energy["model.layers.1.mlp.down_proj"], (x * x).mean(0).numpy(),
                               rtol=1e-4)
    assert set(stats.sensitivity) == set(quantizable_linears(loaded.model, loaded.architecture))
    assert all(v > 0 for v in stats.sensitivity.values())


def test_sensitivity_is_the_mean_squared_output_gradient(loaded):
    """s = mean of (∂ℓ/∂y)², ℓ the summed next-token loss, checked against one plain autograd pass over the
    whole model; and the column weights s·m·(h/m)^a keep the layer's mean for any activation power a."""
    ids, _ = calibration_tokens(loaded, None, 2, 16, seed=0, progress=False)
    stats = collect_layer_stats(loaded.model, loaded.architecture, ids, sensitivity=True, progress=False)
    down = loaded.model.model.layers[1].mlp.down_proj
    seen = {}

    def grab(module, inputs, output):
        seen["x"] = inputs[0].detach()
        output.retain_grad()
        seen["y"] = output

    handle = down.register_forward_hook(grab)
    try:
        logits = loaded.model(ids).logits
    finally:
        handle.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    loaded.model.zero_grad(set_to_none=True)
    name = "model.layers.1.mlp.down_proj"
    assert stats.sensitivity[name] == pytest.approx(float((seen["y"].grad.double() ** 2).mean()), rel=1e-3)
    s, h = stats.sensitivity[name], stats.input_energy[name]
    np.testing.assert_allclose(stats.column_weights(name), s * h)
    np.testing.assert_allclose(stats.column_weights(name, activation_power=0.0), np.full_like(h, s * h.mean()))
    half = stats.column_weights(name, activation_power=0.5)
    np.testing.assert_allclose(half, s * np.sqrt(h * h.mean()))
    assert half.max() / half.min() == pytest.approx(np.sqrt(h.max() / h.min()))


@pytest.fixture(scope="module")
def measured(loaded):
    ids, _ = calibration_tokens(loaded, None, 8, 32, seed=0, progress=False)
    held, _ = calibration_tokens(loaded, None, 2, 32, seed=1, progress=False)  # the default chooses the power
    method = Method("sage", {"preset": "v2"})
    seeds = layer_seeds(loaded, 0)
    with MatrixPool(1) as pool:
        m = measure_v2(loaded, method.sage_recipe(), method.sage_config(), seeds, ids, pool, progress=False,
                       validation=held)
    assert m.power_choice["chosen"] in method.sage_recipe().activation_power_candidates
    return seeds, m


@pytest.mark.parametrize("target", [2.5, 3.0, 4.0])
def test_budget_lands_within_two_hundredths(loaded, measured, target):
    seeds, m = measured
    method = Method("sage", {"preset": "v2", "bits": target})
    work = copy.copy(loaded)
    work.model = copy.deepcopy(loaded.model)
    with MatrixPool(1) as pool:
        results, summary = finish_v2(work, method.sage_recipe(), method.sage_config(), seeds, m, pool,
                                     progress=False, keep_measurements=True)
    bits = bits_summary(layer_rows(results))  # every packed byte, as the report counts them
    assert bits["true_bits"] == pytest.approx(summary["true_bits"], rel=1e-12)
    assert abs(bits["true_bits"] - target) <= 0.02, (target, bits["true_bits"], summary)
    assert summary["planned_bits"] <= target + 1e-9
    groups = {r.stats["n_groups"] for r in results.values()}
    assert groups <= {1, 2, 4, 8, 16}
    assert all("graph_groups" in r.stats and "budget_groups" in r.stats for r in results.values())
    QuantizedModel(method, results, 0, 0.0)  # the harness's container accepts them


def finished(loaded, seeds, m, **recipe_fields):
    """finish_v2 on a copy of the model with the default v2 recipe changed by recipe_fields."""
    method = Method("sage", {"preset": "v2"})
    recipe = replace(method.sage_recipe(), **recipe_fields)
    work = copy.copy(loaded)
    work.model = copy.deepcopy(loaded.model)
    with MatrixPool(1) as pool:
        return finish_v2(work, recipe, method.sage_config(), seeds, m, pool, progress=False, keep_measurements=True)


def test_budget_is_a_cap_with_refinement_off(loaded, measured):
    """refine_rho=False (the default) keeps every matrix at the option the budget chose, so the achieved bits are
    the planned ones: at most the budget and, with fill, at least the budget − 0.02."""
    seeds, m = measured
    for target in (2.5, 3.2):
        results, summary = finished(loaded, seeds, m, bits=target, refine_rho=False)
        bits = bits_summary(layer_rows(results))["true_bits"]
        assert bits == pytest.approx(summary["planned_bits"], abs=1e-12)
        assert target - 0.02 <= bits <= target, (target, bits)


def test_compensation_lowers_the_output_error_of_a_layer(loaded, measured):
    """Compensation must change the stored values and lower ‖X(W − Ŵ)ᵀ‖ on the calibration inputs of a first-block
    layer (whose inputs quantization cannot change)."""
    seeds, m = measured
    name = "model.layers.0.mlp.down_proj"
    ids, _ = calibration_tokens(loaded, None, 8, 32, seed=0, progress=False)
    captured = []
    handle = loaded.model.get_submodule(name).register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    try:
        with torch.no_grad():
            loaded.model(ids)
    finally:
        handle.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1]).double().numpy()
    w = loaded.model.get_submodule(name).weight.detach().double().numpy()

    def output_error(results):
        return float(np.linalg.norm(x @ (w - results[name].dequantize()).T))

    with_comp, _ = finished(loaded, seeds, m, bits=3.2, compensate_min_tokens_per_column=0)
    without, _ = finished(loaded, seeds, m, bits=3.2, compensate=False)
    assert output_error(with_comp) < 0.97 * output_error(without)


def test_activation_energy_and_sensitivity_reach_option_measurement(loaded, monkeypatch):
    """The column weights that option measurement sees are s^p·m·(h/m)^a of the statistics, not None or ones."""
    import sage_export.pipeline.sage_v2 as v2

    seen = {}
    real = v2.sage_options

    def spy(w, cfg, groups, rhos, seed, col_weight, *args, **kwargs):
        seen[w.shape, seed] = col_weight
        return real(w, cfg, groups, rhos, seed, col_weight, *args, **kwargs)

    monkeypatch.setattr(v2, "sage_options", spy)
    ids, _ = calibration_tokens(loaded, None, 4, 16, seed=0, progress=False)
    method = Method("sage", {"preset": "v2"})
    recipe = replace(method.sage_recipe(), sensitivity_power=0.5, activation_power_candidates=())  # one pass
    seeds = layer_seeds(loaded, 0)
    with MatrixPool(1) as pool:
        m = measure_v2(loaded, recipe, method.sage_config(), seeds, ids, pool, progress=False)
    linears = quantizable_linears(loaded.model, loaded.architecture)
    assert len(seen) == len(linears)
    for name, linear in linears.items():
        got = seen[tuple(linear.weight.shape), seeds[name]]
        h = m.stats.input_energy[name]
        want = h.mean() * (h / h.mean()) ** recipe.activation_power * m.stats.sensitivity[name] ** 0.5
        assert got is not None and np.ptp(got) > 0
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_refit_rounds_reach_every_compensated_matrix_and_only_move_scales(loaded, measured):
    """refit_rounds: every compensated matrix is re-fitted (its calibration output error drops) and keeps the
    stored sizes of the plain compensated run; matrices the gate leaves alone are not touched."""
    seeds, m = measured
    k_mlp = loaded.model.config.intermediate_size
    ratio = m.stats.tokens / k_mlp + 0.5  # down_proj is gated out, as in the test below
    plain, _ = finished(loaded, seeds, m, bits=3.2, compensate_min_tokens_per_column=ratio)
    refit, _ = finished(loaded, seeds, m, bits=3.2, compensate_min_tokens_per_column=ratio, refit_rounds=2)
    for name, r in refit.items():
        sizes = {k: v.shape for k, v in r.stored_tensors().items()}
        assert sizes == {k: v.shape for k, v in plain[name].stored_tensors().items()}, name
        if name.endswith("down_proj"):
            assert "refit_rounds" not in r.stats, name
            np.testing.assert_array_equal(r.dequantize(), plain[name].dequantize(), err_msg=name)
        else:
            assert r.stats["refit_rounds"] == 2 and r.stats["refit_gain"] < 1, name
            assert r.stats["hessian_error"] < plain[name].stats["hessian_error"], name


def test_compensation_skips_matrices_with_too_few_tokens_per_column(loaded, measured):
    """With compensate_min_tokens_per_column above tokens / K, a matrix is left as the ρ search made it."""
    seeds, m = measured
    k_mlp = loaded.model.config.intermediate_size  # down_proj's K, the widest input
    ratio = m.stats.tokens / k_mlp + 0.5  # down_proj falls below, the hidden-size inputs stay above
    assert m.stats.tokens >= ratio * loaded.model.config.hidden_size
    gated, _ = finished(loaded, seeds, m, bits=3.2, compensate_min_tokens_per_column=ratio)
    full, _ = finished(loaded, seeds, m, bits=3.2, compensate_min_tokens_per_column=0)
    off, _ = finished(loaded, seeds, m, bits=3.2, compensate=False)
    for name in gated:
        want = off if name.endswith("down_proj") else full
        np.testing.assert_array_equal(gated[name].dequantize(), want[name].dequantize(), err_msg=name)


def test_sequential_inputs_take_later_hessians_after_the_quantized_blocks(loaded, measured, monkeypatch):
    """sequential_inputs: block 0 is compensated exactly as from the kept inputs (nothing runs before it); every
    later block's XᵀX comes from inputs that went through the already-quantized blocks, so its result differs."""
    import sage_export.pipeline.sage_v2 as v2

    seeds, m = measured
    seen = []
    real = v2.block_hessians

    def spy(model, arch, stats, index, block_weights, inputs=None, **kwargs):
        seen.append((index, inputs is None or inputs is stats.block_inputs[index]))
        return real(model, arch, stats, index, block_weights, inputs, **kwargs)

    monkeypatch.setattr(v2, "block_hessians", spy)
    kept, _ = finished(loaded, seeds, m, bits=3.2, compensate_min_tokens_per_column=0)
    n = len(m.stats.block_inputs)
    assert seen == [(i, True) for i in range(n)]
    seen.clear()
    chained, _ = finished(loaded, seeds, m, bits=3.2, compensate_min_tokens_per_column=0, sequential_inputs=True)
    assert seen == [(0, True)] + [(i, False) for i in range(1, n)]
    assert list(chained) == list(kept)
    for name in kept:
        same = np.array_equal(chained[name].dequantize(), kept[name].dequantize())
        assert same == (".layers.0." in name), name


def test_matrices_the_gate_leaves_uncompensated_get_no_hessian(loaded, measured, monkeypatch):
    """256 calibration tokens at 2 per column gate out down_proj (K = 164) and keep the K = 68 matrices: XᵀX is
    taken only for those (a K = 8,960 down_proj's would cost K² per token for nothing), and down_proj comes out
    exactly as with compensation off."""
    import sage_export.pipeline.sage_v2 as v2

    seeds, m = measured
    asked = []
    real = v2.block_hessians

    def spy(*args, linears=None, **kwargs):
        asked.append(linears)
        return real(*args, linears=linears, **kwargs)

    monkeypatch.setattr(v2, "block_hessians", spy)
    gated, _ = finished(loaded, seeds, m, bits=3.2, compensate_min_tokens_per_column=2)
    assert asked and all("mlp.down_proj" not in names and "self_attn.q_proj" in names for names in asked)
    plain, _ = finished(loaded, seeds, m, bits=3.2, compensate=False)
    for name in gated:
        same = np.array_equal(gated[name].dequantize(), plain[name].dequantize())
        assert same == name.endswith("mlp.down_proj"), name


def test_validation_rows_stay_out_of_the_statistics_and_pick_each_compensation(loaded):
    """Validation rows change no statistic (h, s, the kept inputs), give each block a second XᵀX of their own, and
    with compensate_candidates every compensated matrix records which shrink its validation error kept."""
    ids, _ = calibration_tokens(loaded, None, 8, 32, seed=0, progress=False)
    held, _ = calibration_tokens(loaded, None, 2, 32, seed=1, progress=False)
    method = Method("sage", {"preset": "v2", "activation_power": 0.5})  # one power: no rows needed for it
    seeds = layer_seeds(loaded, 0)
    with MatrixPool(1) as pool:
        plain = measure_v2(loaded, method.sage_recipe(), method.sage_config(), seeds, ids, pool, progress=False)
        m = measure_v2(loaded, method.sage_recipe(), method.sage_config(), seeds, ids, pool, progress=False,
                       validation=held)
    assert plain.stats.validation_inputs is None and len(m.stats.validation_inputs) == len(m.stats.block_inputs)
    assert m.stats.sensitivity == plain.stats.sensitivity
    for name, h in plain.stats.input_energy.items():
        np.testing.assert_array_equal(m.stats.input_energy[name], h)
    arch = loaded.architecture
    fit = block_hessians(loaded.model, arch, m.stats, 1)
    val = block_hessians(loaded.model, arch, m.stats, 1, validation=True)
    assert fit.keys() == val.keys() and not any(np.allclose(fit[n], val[n]) for n in fit)
    with pytest.raises(ValueError, match="validation rows"):
        finished(loaded, seeds, plain, compensate_min_tokens_per_column=0, compensate_candidates=(0.0, 1.0))
    results, _ = finished(loaded, seeds, m, compensate_min_tokens_per_column=0, compensate_candidates=(0.0, 1.0))
    kept = [r.stats["compensate_shrink"] for r in results.values()]
    assert all("validation_errors" in r.stats for r in results.values()) and set(kept) <= {0.0, 1.0}
    reference, _ = finished(loaded, seeds, m, compensate_min_tokens_per_column=0)
    for name, r in results.items():  # shrink 0 kept: exactly the plain compensation's values
        if r.stats["compensate_shrink"] == 0.0:
            np.testing.assert_array_equal(r.dequantize(), reference[name].dequantize())


def test_activation_power_is_chosen_by_the_uncompensated_loss_on_validation_rows(loaded):
    """With activation_power_candidates each power's options are measured, each allocation at
    activation_power_bits (not the run's budget) is built without compensation and scored on the validation rows
    with the model otherwise untouched; the lowest loss keeps its measurements, exactly those of a plain run at
    that power."""
    from sage_export.materialize import apply_dequantized
    from sage_export.pipeline.guard import mean_nll
    from sage_export.pipeline.sage_v2 import _finish, _finish_item, plan_budget

    ids, _ = calibration_tokens(loaded, None, 8, 32, seed=0, progress=False)
    held, _ = calibration_tokens(loaded, None, 2, 32, seed=1, progress=False)
    method = Method("sage", {"preset": "v2"})
    cfg, seeds = method.sage_config(), layer_seeds(loaded, 0)
    recipe = replace(method.sage_recipe(), activation_power_candidates=(1.0, 0.25), bits=2.5)
    assert recipe.activation_power_bits == 3.2
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fp_ppl = np.exp(mean_nll(loaded.model, held))
    with MatrixPool(1) as pool:
        with pytest.raises(ValueError, match="validation rows"):
            measure_v2(loaded, recipe, cfg, seeds, ids, pool, progress=False)
        m = measure_v2(loaded, recipe, cfg, seeds, ids, pool, progress=False, validation=held)
        scores = {c["activation_power"]: c["validation_ppl"] for c in m.power_choice["candidates"]}
        assert list(scores) == [1.0, 0.25] and m.power_choice["chosen"] == min(scores, key=scores.get)
        assert m.power_choice["budget_bits"] == 3.2
        for name, state in loaded.model.state_dict().items():  # trying the powers left the model as it was
            torch.testing.assert_close(state, before[name], rtol=0, atol=0)
        for power, ppl in scores.items():  # each score: that power's uncompensated model on the validation rows
            trial = replace(recipe, activation_power=power, activation_power_candidates=())
            plain = measure_v2(loaded, trial, cfg, seeds, ids, pool, progress=False)
            if power == m.power_choice["chosen"]:
                assert [[o.error for o in t] for t in plain.tables] == [[o.error for o in t] for t in m.tables]
            plan = plan_budget(plain, seeds, recipe.activation_power_bits)
            built = {name: _finish(_finish_item(plan, trial, cfg, name, loaded.weight(name), None))
                     for name in plain.names}
            work = copy.deepcopy(loaded.model)
            apply_dequantized(work, built)
            assert np.exp(mean_nll(work, held)) == pytest.approx(ppl, rel=1e-5)
            # the quantized weights were the ones that ran: the unquantized model is further off than rel 1e-5
            assert abs(ppl - fp_ppl) > 1e-4 * fp_ppl
    _, summary = finished(loaded, seeds, m, activation_power_candidates=(1.0, 0.25))
    assert summary["activation_power_choice"] == m.power_choice


def test_powers_are_compared_at_the_reference_budget_or_the_least_the_options_store():
    """comparison_bits: activation_power_bits where the options can store it, else their least; None: the run's."""
    from sage_export.pipeline.sage_v2 import Measurements, comparison_bits
    from sage_export.quant.budget import Option
    from sage_export.quant.config import SageRecipe

    def option(nbytes):
        return Option(n_groups=1, rho=0.0, nnz=0, error=1.0, nbytes=nbytes)

    tables = [[option(100), option(400)], [option(300), option(600)]]  # 1,000 weights: least 3.2 bits
    m = Measurements(None, ["a", "b"], tables, {}, {}, 1000, {})
    assert comparison_bits(SageRecipe(bits=2.0), m) == 3.2
    assert comparison_bits(SageRecipe(bits=2.0, activation_power_bits=5.0), m) == 5.0
    assert comparison_bits(SageRecipe(bits=2.0, activation_power_bits=1.0), m) == pytest.approx(3.2)
    assert comparison_bits(SageRecipe(bits=2.0, activation_power_bits=None), m) == 2.0

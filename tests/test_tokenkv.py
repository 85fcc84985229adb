"""Token-conditioned cross-attention components (issue 41, item 1): a cross-attention head's key and value at the
concept's tokens (``attn2#kvH``), ablated by the anchor prompt's (interp.core.tokens)."""

from __future__ import annotations

import pytest
import torch
from helpers import denoise_with_kv_written

import interp
from interp.core.components import UnknownComponentError
from interp.core.interventions import call_denoiser, compile_plan, run_unet
from interp.core.objectives import Objective, ObjectiveConfig

MID = "unet.mid_block.attentions.0.transformer_blocks.0.attn2"


def _heads(model) -> int:
    return sum(model.module(p).heads for p, i in model.space.modules.items() if i.kind == "attn2")


def test_addresses_parse_print_back_and_enumerate(tiny_world_model):
    m = tiny_world_model
    comps = m.components("tokenkv")
    assert len(comps) == _heads(m) > 0
    assert {c.granularity for c in comps} == {"tokenkv"} and {c.family for c in comps} == {"attn2"}
    c = m.space.parse(f"{MID}#kv1")
    assert str(c) == f"{MID}#kv1" and c.index == 1 and c.module == MID and c.kind == "attn2"
    assert f"{MID}#kv1" in comps.addresses
    assert m.components("tokenkv", block="mid_block").addresses == [f"{MID}#kv{h}" for h in range(m.module(MID).heads)]
    n = m.module(MID).heads
    with pytest.raises(UnknownComponentError, match=rf"has {n} heads, indices 0..{n - 1}"):
        m.space.parse(f"{MID}#kv{n}")
    with pytest.raises(UnknownComponentError, match="no token-KV components; they are cross-attention"):
        m.space.parse(f"{MID[:-1]}1#kv0")  # attn1: self-attention reads no text
    with pytest.raises(UnknownComponentError, match="is not a token-KV address"):
        m.space.parse(f"{MID}#kvx")


def _world_rows(obj):
    """The target rows of an objective's samples, as the UNet sees them, and their token rows."""
    return obj.x_t, obj.t, obj.ctx_target[obj.image_index], obj.token_binding().rows(obj.image_index)


@pytest.mark.parametrize("granularity", ["tokenkv", "tokenspan"])
def test_intact_multiplier_is_the_model_bitwise(tiny_world_model, tiny_red_objective, granularity):
    m, obj = tiny_world_model, tiny_red_objective
    comps = m.components(granularity)
    plan = compile_plan(m, comps)
    assert plan.has_tokens and all(s.span == (granularity == "tokenspan") for s in plan.denoiser)
    x, t, ctx, rows = _world_rows(obj)
    with torch.no_grad():
        plain = call_denoiser(m, x, t, ctx)
        eps = run_unet(m, x, t, ctx, plan, torch.ones(1, len(comps)), tokens=rows)[0]
        assert torch.equal(eps, plain)
        assert torch.equal(obj.values(plan, torch.ones(1, len(comps)))[0], obj.intact)


@pytest.mark.parametrize("concept,shift", [("red", -1), ("circle", 0)])
def test_ablation_is_the_anchor_key_and_value_at_the_concept_tokens(tiny_world_model, tiny_objective_config, concept,
                                                                    shift):
    """Known answer in plain torch: forward hooks on one cross-attention's to_k and to_v write, at the concept word's
    position in each target prompt, head h's slice of the anchor caption's key and value: at the position before it
    when the anchor leaves the word out (a colour), at the same position when it puts another word there (a shape:
    ``shape``)."""
    m = tiny_world_model
    obj = Objective(m, concept, tiny_objective_config)
    h = 1
    attn = m.module(MID)
    d = attn.to_k.out_features // attn.heads
    sl = slice(h * d, (h + 1) * d)
    word = m.tokenizer(concept, add_special_tokens=False).input_ids
    assert len(word) == 1
    ids, aids = m.tokenize(obj.target_prompts), m.tokenize(obj.anchor_prompts)
    pos = [row.tolist().index(word[0]) for row in ids]
    for i, p in enumerate(pos):  # the anchor's token at the aligned position
        assert (aids[i, p + shift] != word[0]) and (shift == -1 or m.tokenizer.decode(aids[i, p]).strip() == "shape")
    with torch.no_grad():
        ka, va = attn.to_k(obj.ctx_anchor), attn.to_v(obj.ctx_anchor)  # (P, L, features): the anchors' keys, values

    def write(out, ref):
        for j, i in enumerate(obj.image_index.tolist()):
            out[j, pos[i], sl] = ref[i, pos[i] + shift, sl]

    x, t, ctx, rows = _world_rows(obj)
    by_hand = denoise_with_kv_written(m, attn, ka, va, write, x, t, ctx)
    comps = interp.ComponentSet([m.space.parse(f"{MID}#kv0"), m.space.parse(f"{MID}#kv{h}")])
    with torch.no_grad():
        eps = run_unet(m, x, t, ctx, compile_plan(m, comps), torch.tensor([[1.0, 0.0]]), tokens=rows)[0]
        plain = call_denoiser(m, x, t, ctx)
    torch.testing.assert_close(eps, by_hand, rtol=0, atol=1e-6)
    assert (eps - plain).abs().max() > 1e-6  # the unit matters: the test can fail


def test_anchors_of_other_prompts_follow_the_concepts_own_substitution(tiny_world_model):
    from interp.core.tokens import anchor_prompts, positions, substitution

    m = tiny_world_model
    circle, white = m.world.concept("circle", n=2, seed=0), m.world.concept("white", n=2, seed=0)
    assert substitution(circle) == ("circle", "shape") and substitution(white) == ("on white", "")
    assert substitution(interp.text_concept("red")) is None  # an empty anchor shares no words with its prompt
    assert anchor_prompts(circle, ["a red circle on black", "a red square on black"]) == ["a red shape on black", None]
    assert anchor_prompts(white, ["a red circle on white"]) == ["a red circle"]
    assert anchor_prompts("red", ["a red circle on white"]) == ["a circle on white"]
    (a, pos, apos), = positions(m, white, ["a red circle on white"])
    ids = m.tokenize(["a red circle on white"])[0].tolist()
    assert a == "a red circle" and ids[pos[0]] == m.tokenizer("white", add_special_tokens=False).input_ids[0]
    assert apos == [pos[0] - 2]  # "on white" left out: the anchor's "circle", the last token before the difference


def test_anchor_branch_and_prompts_without_the_concept_are_untouched(tiny_world_model, tiny_red_objective):
    m, obj = tiny_world_model, tiny_red_objective
    comps = m.components("tokenkv")
    plan = compile_plan(m, comps)
    x, t = obj.x_t, obj.t
    ctx = obj.ctx_anchor[obj.image_index]
    none = obj.token_binding().rows(torch.full((len(x),), -1))
    with torch.no_grad():
        assert torch.equal(run_unet(m, x, t, ctx, plan, torch.zeros(1, len(comps)), tokens=none)[0],
                           call_denoiser(m, x, t, ctx))
    from interp.core.tokens import bind

    b = bind(m, "red", ["a red circle on white", "a blue square on white"], strict=False)
    assert b.mask[0].sum() == 1 and not b.mask[1].any()
    with pytest.raises(ValueError, match="does not name the concept 'red'"):
        bind(m, "red", ["a blue square on white"], strict=True)


@pytest.mark.parametrize("granularity", ["tokenkv", "tokenspan"])
def test_cad_is_the_multiplier_gradient_and_ablation_the_measured_change(tiny_world_model, granularity):
    """float64: CAD's score of a token-KV (or token-span) unit is dJ/dm at m = 1 (central finite difference), and
    true ablation's is J(intact) - J(m = 0), both computed here from the objective's values."""
    m = tiny_world_model
    obj = Objective(m, "red", ObjectiveConfig(n_images=2, timesteps=(300, 700), dtype="float64"))
    comps = interp.ComponentSet(list(obj.model.components(granularity, block=["mid_block", "up_blocks.1"]))[:6])
    cad = interp.attribute("cad", obj.model, "red", comps, objective=obj, n_groups=1).set_index("component").score
    truth = interp.attribute("ablation", obj.model, "red", comps, objective=obj).set_index("component").score
    plan = compile_plan(obj.model, comps)
    e = 1e-5
    eye = torch.eye(len(comps), dtype=torch.float64)
    with torch.no_grad():
        up = obj.values(plan, 1 + e * eye).mean(1)
        down = obj.values(plan, 1 - e * eye).mean(1)
        zero = obj.values(plan, 1 - eye).mean(1)
    fd = (up - down) / (2 * e)
    torch.testing.assert_close(torch.tensor(cad[comps.addresses].to_numpy()), fd, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(torch.tensor(truth[comps.addresses].to_numpy()), obj.intact.mean() - zero,
                               rtol=1e-9, atol=1e-15)
    assert fd.abs().max() > 1e-7 and (zero != obj.intact.mean()).any()


def test_mean_ablation_puts_the_units_mean_at_the_concept_tokens(tiny_world_model, tiny_red_objective):
    from interp.core.objectives import reference_means

    m, obj = tiny_world_model, tiny_red_objective
    comps = m.components("tokenkv", block="mid_block")
    plan = compile_plan(m, comps)
    means = reference_means(obj, plan, branch="anchor")
    assert set(means) == {f"{MID}.to_k", f"{MID}.to_v"}
    assert means[f"{MID}.to_k"].shape == (m.module(MID).to_k.out_features,)
    with torch.no_grad():
        J_mean = obj.values(plan, torch.zeros(1, len(comps)), means)
        J_zero = obj.values(plan, torch.zeros(1, len(comps)))
    assert not torch.equal(J_mean, J_zero) and not torch.equal(J_mean[0], obj.intact)


@pytest.mark.parametrize("method", ["ablation", "cad", "coar", "maskgrad", "midpoint", "ig", "screen"])
def test_every_method_attributes_token_kv_units(tiny_world_model, tiny_red_objective, method):
    comps = tiny_world_model.components("tokenkv", block="mid_block")
    opts = {"coar": {"n_masks": 10}, "maskgrad": {"n_masks": 2}, "ig": {"steps": 2}}.get(method, {})
    df = interp.attribute(method, tiny_world_model, "red", comps, objective=tiny_red_objective, **opts)
    main = df[df["variant"] == method] if "variant" in df else df
    assert list(main["component"]) == comps.addresses and main["score"].notna().all()
    assert set(main["granularity"]) == {"tokenkv"}


def test_tracing_refuses_token_kv_units(tiny_world_model, tiny_red_objective):
    comps = tiny_world_model.components("tokenkv", block="mid_block")
    with pytest.raises(ValueError, match="tracing does not handle \\['tokenkv'\\] granularity"):
        interp.attribute("tracing", tiny_world_model, "red", comps, objective=tiny_red_objective)


def test_a_target_prompt_without_the_word_fails_in_one_line_before_any_work(tiny_world_model, monkeypatch):
    concept = interp.Concept("red", ("a red circle on white", "a blue square on white"),
                             ("a circle on white", "a square on white"))

    def built(*a, **k):
        raise AssertionError("the objective was built")

    monkeypatch.setattr(Objective, "_build", built)
    with pytest.raises(ValueError, match="prompt 'a blue square on white' does not name the concept 'red'") as e:
        interp.attribute("ablation", tiny_world_model, concept, tiny_world_model.components("tokenkv"),
                         objective=ObjectiveConfig(n_images=2))
    assert "\n" not in str(e.value)


def test_ablation_edit_generates_with_the_concept_tokens_replaced(tiny_world_model):
    from interp.core.generation import generate
    from interp.studies.editing.edits import AblationEdit

    m = tiny_world_model
    comps = m.components("tokenkv").addresses
    prompts = ["a red circle on white", "a blue square on white"]
    with torch.no_grad():
        plain = generate(m, prompts, steps=2, decode=False)
        with AblationEdit(tuple(comps), concept="red").apply(m) as edited:
            ablated = edited.generate(prompts, steps=2, decode=False)
    assert not torch.equal(ablated[0], plain[0])  # the prompt that names red changed
    assert torch.equal(ablated[1], plain[1])  # the one that does not is untouched
    with pytest.raises(ValueError, match="needs its concept"):
        with AblationEdit(tuple(comps)).apply(m):
            pass


def test_joint_attention_families_are_refused_by_name(tiny_family_models):
    m = tiny_family_models["sd3"]
    with pytest.raises(ValueError, match="SD3Transformer2DModel reads the text through joint attention.*attn_context") as e:
        m.components("tokenkv")
    assert "\n" not in str(e.value)
    with pytest.raises(UnknownComponentError, match="joint attention"):
        m.space.parse("transformer.transformer_blocks.0.attn#kv0")


@pytest.mark.slow  # a tiny pipeline of each family with cross-attention: ~20 s
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "pixart"])
def test_every_cross_attention_family(family, tmp_path):
    """Stable Diffusion 1.x/2.x, SDXL (two CLIPs side by side) and PixArt (T5 after its caption projection): the
    intact multiplier is the model, ablating every unit moves J, and CAD is the finite-difference gradient."""
    from interp.testing import tiny_pipeline

    m = interp.load_model(str(tiny_pipeline(tmp_path / family, family)), device="cpu")
    cfg = ObjectiveConfig(n_images=1, timesteps=(500,), gen_steps=2, dtype="float64")
    obj = Objective(m, interp.text_concept("red", n=1), cfg)
    comps = obj.model.components("tokenkv")
    assert len(comps) == _heads(obj.model) > 0
    plan = compile_plan(obj.model, comps)
    with torch.no_grad():
        assert torch.equal(obj.values(plan, torch.ones(1, len(comps), dtype=torch.float64))[0], obj.intact)
        assert not torch.equal(obj.values(plan, torch.zeros(1, len(comps), dtype=torch.float64))[0], obj.intact)
    few = interp.ComponentSet(list(comps)[:3])
    cad = interp.attribute("cad", obj.model, obj.concept, few, objective=obj, n_groups=1)["score"].to_numpy()
    e = 1e-5
    eye = torch.eye(len(few), dtype=torch.float64)
    plan = compile_plan(obj.model, few)
    with torch.no_grad():
        fd = (obj.values(plan, 1 + e * eye).mean(1) - obj.values(plan, 1 - e * eye).mean(1)) / (2 * e)
    torch.testing.assert_close(torch.tensor(cad), fd, rtol=1e-4, atol=1e-12)


@pytest.mark.slow  # ~14 s: a comparison and an erasure-curve run
def test_compare_methods_and_erasure_curves_on_token_kv_units(tiny_world_folder, tmp_path, refused, no_figures):
    """``--granularity tokenkv``: the comparison runs every default method that attributes them (not causal
    tracing), one row per cross-attention head, and the erasure curves ablate their rankings in generation."""
    import pandas as pd

    from analyses import compare_methods, erasure_curves

    common = ["--model", str(tiny_world_folder), "--concepts", "red", "--images", "1", "--timesteps", "300",
              "--no-progress", "--threads", "1"]
    assert compare_methods.main([*common, "--granularity", "tokenkv", "--lds-alphas", "0.2", "--heldout-masks", "10",
                                 "--n-boot", "100", "--out", str(tmp_path / "run")]) == 0
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(df.granularity) == {"tokenkv"} and "tracing" not in set(df.method)
    assert {"ablation", "cad", "coar"} <= set(df.method)
    heads = sum(1 for c in df[df.variant == "ablation"].component.unique())
    assert heads == 14 and all("#kv" in c for c in df.component)
    assert "do not attribute token-KV components" in refused(
        compare_methods.main, [*common, "--granularity", "tokenkv", "--methods", "ablation", "tracing",
                               "--out", str(tmp_path / "x")])
    out = tmp_path / "curves"
    assert erasure_curves.main(["--model", str(tiny_world_folder), "--concepts", "red", "--granularity", "tokenkv",
                                "--methods", "cad", "ablation", "--k", "1", "4", "--images", "6", "--steps", "2",
                                "--random-rankings", "1", "--random-masks", "2", "--n-boot", "100",
                                "--attr-images", "1", "--timesteps", "300", "--no-progress", "--threads", "1",
                                "--out", str(out)]) == 0
    curves = pd.read_parquet(out / "results.parquet")
    assert {"cad", "ablation"} <= set(curves["method"]) and set(curves["k"]) >= {0, 1, 4}


def test_the_plan_times_token_kv_passes(tiny_world_folder):
    from interp.studies.compare_config import CompareConfig
    from interp.studies.plan import plan_comparison

    cfg = CompareConfig(model=str(tiny_world_folder), concepts=("red",), methods=("ablation", "cad"),
                        granularity="tokenkv", n_images=1, timesteps=(300,), heldout_masks=10, lds_alphas=(0.2,),
                        n_boot=100)
    plan = plan_comparison(cfg, measure=True)
    assert plan.n_components == 14
    t = plan.table.set_index("method")
    assert t.loc["ablation", "forward_evals"] == 14 and t.loc["cad", "backward_evals"] == 1


def test_the_generation_objective_ablates_token_kv_units_in_every_step(tiny_world_folder):
    """The classifier objective (the judge on images generated through the loop): the intact multiplier is J itself,
    an ablation changes the generated images, and CAD and true ablation give finite scores. (The tiny world's random
    judge is float32 and nearly flat, so no finite difference resolves its gradient here.)"""
    m = interp.load_model(str(tiny_world_folder))
    obj = Objective(m, "red", ObjectiveConfig(kind="classifier", n_images=2, gen_steps=2))
    comps = interp.ComponentSet(list(m.components("tokenkv", block="mid_block")))
    plan = compile_plan(m, comps)
    with torch.no_grad():
        assert torch.equal(obj.values(plan, torch.ones(1, len(comps)))[0], obj.intact)
        assert not torch.equal(obj.values(plan, torch.zeros(1, len(comps)))[0], obj.intact)
    for method in ("cad", "ablation"):
        df = interp.attribute(method, m, "red", comps, objective=obj)
        assert df["score"].notna().all() and torch.isfinite(torch.tensor(df["score"].to_numpy())).all()


@pytest.mark.parametrize("granularity", ["tokenkv", "tokenspan"])
def test_replaying_the_unet_upstream_gives_the_same_single_ablations(tiny_world_model, tiny_objective_config,
                                                                     granularity):
    obj = Objective(tiny_world_model, "red", tiny_objective_config)
    comps = tiny_world_model.components(granularity)
    plan = compile_plan(tiny_world_model, comps)
    M = 1 - torch.eye(len(comps))
    with torch.no_grad():
        obj.replay_prefix = False
        full = obj.values(plan, M)
        obj.replay_prefix = "always"
        replayed = obj.values(plan, M)
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-9)
    assert (full != obj.intact).any()


@pytest.mark.slow  # one erasure run
def test_end_to_end_matrix_has_the_token_kv_kind(tiny_world_folder, tmp_path, no_figures):
    import json

    import pandas as pd

    from analyses.end_to_end import main

    out = tmp_path / "e2e"
    assert main(["--model", str(tiny_world_folder), "--concepts", "red", "--kinds", "token-kv", "--objectives",
                 "one-step", "--methods", "cad", "ablation", "--blocks", "mid_block", "--k", "1", "2",
                 "--images", "6", "--steps", "2", "--attr-images", "1", "--random-masks", "2", "--n-boot", "100",
                 "--device", "cpu", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    m = pd.read_csv(out / "matrix.csv")
    assert set(m["kind"]) == {"token-kv"} and set(m["method"]) == {"cad", "ablation"}
    ranking = json.loads((out / "cells" / "token-kv__one-step" / "meta.json").read_text())["ranking_config"]
    assert ranking["granularity"] == "tokenkv"
    points = pd.read_parquet(out / "cells" / "token-kv__one-step" / "results.parquet")
    assert set(points["k"]) >= {0, 1, 2}

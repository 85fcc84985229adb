"""Token-span components (``attn2#kvsH``): a cross-attention head's key and value at the concept's tokens and every
later context position (the causal text encoder lets every later state see the concept), ablated by the anchor
prompt's at the aligned positions (interp.core.tokens)."""

from __future__ import annotations

import pytest
import torch
from helpers import denoise_with_kv_written

import interp
from interp.core.components import UnknownComponentError
from interp.core.interventions import call_denoiser, compile_plan, run_unet
from interp.core.objectives import Objective

MID = "unet.mid_block.attentions.0.transformer_blocks.0.attn2"


def _world_rows(obj):
    """The target rows of an objective's samples, as the UNet sees them, and their token rows."""
    return obj.x_t, obj.t, obj.ctx_target[obj.image_index], obj.token_binding().rows(obj.image_index)


def test_addresses_parse_print_back_and_enumerate(tiny_world_model):
    m = tiny_world_model
    comps = m.components("tokenspan")
    assert len(comps) == len(m.components("tokenkv")) > 0
    assert {c.granularity for c in comps} == {"tokenspan"} and {c.family for c in comps} == {"attn2"}
    c = m.space.parse(f"{MID}#kvs1")
    assert str(c) == f"{MID}#kvs1" and c.index == 1 and c.module == MID and c.granularity == "tokenspan"
    assert m.space.parse(f"{MID}#kv1").granularity == "tokenkv"
    assert m.components("tokenspan", block="mid_block").addresses == [f"{MID}#kvs{h}"
                                                                      for h in range(m.module(MID).heads)]
    n = m.module(MID).heads
    with pytest.raises(UnknownComponentError, match=rf"has {n} heads, indices 0..{n - 1}"):
        m.space.parse(f"{MID}#kvs{n}")
    with pytest.raises(UnknownComponentError, match="is not a token-KV address"):
        m.space.parse(f"{MID}#kvsx")


def test_the_span_is_the_concept_and_every_later_position_aligned_by_the_token_difference(tiny_world_model):
    from interp.core.tokens import positions, span_positions

    m = tiny_world_model
    L = m.tokenize(["a red circle on white"]).shape[1]
    for concept, prompt in (("red", "a red circle on white"), ("circle", "a red circle on white"),
                            (m.world.concept("white", n=2, seed=0), "a red circle on white")):
        (a, pos, apos), = positions(m, concept, [prompt])
        (a2, spos, sapos), = span_positions(m, concept, [prompt], L)
        d = len(m.tokenizer(prompt).input_ids) - len(m.tokenizer(a).input_ids)
        assert a2 == a and spos[: len(pos)] == pos and sapos[: len(pos)] == apos
        later = [q for q in range(pos[-1] + 1, L) if 0 <= q - d < L]
        assert spos[len(pos):] == later and sapos[len(pos):] == [q - d for q in later]
        ids, aids = m.tokenize([prompt])[0].tolist(), m.tokenize([a])[0].tolist()
        assert [ids[q] for q in later] == [aids[q - d] for q in later]  # the common suffix, end of text, padding


@pytest.mark.parametrize("concept", ["red", "circle"])
def test_ablation_is_the_anchor_key_and_value_at_the_aligned_span(tiny_world_model, tiny_objective_config, concept):
    """Known answer in plain torch: the anchor prompts run through the model here, and forward hooks on one
    cross-attention's to_k and to_v write, at every position from the concept word's on, head h's slice of the
    anchor's key and value: at the concept's position the one tokenkv aligns (the position before it when the anchor
    leaves the word out, a colour; the same position when it puts ``shape`` there, a shape), at a later position q
    the anchor's q - d (d: the difference of the two prompts' real token counts)."""
    m = tiny_world_model
    obj = Objective(m, concept, tiny_objective_config)
    h = 1
    attn = m.module(MID)
    dh = attn.to_k.out_features // attn.heads
    sl = slice(h * dh, (h + 1) * dh)
    word = m.tokenizer(concept, add_special_tokens=False).input_ids
    assert len(word) == 1
    ids = m.tokenize(obj.target_prompts)
    L = ids.shape[1]
    shift = {"red": -1, "circle": 0}[concept]
    pos = [row.tolist().index(word[0]) for row in ids]
    d = [len(m.tokenizer(p).input_ids) - len(m.tokenizer(a).input_ids)
         for p, a in zip(obj.target_prompts, obj.anchor_prompts)]
    assert set(d) == {{"red": 1, "circle": 0}[concept]}
    with torch.no_grad():  # the anchors' keys and values, from the anchor prompts' own text-encoder states
        actx = m.text_encoder(m.tokenize(obj.anchor_prompts)).last_hidden_state
        ka, va = attn.to_k(actx), attn.to_v(actx)

    def write(out, ref):
        for j, i in enumerate(obj.image_index.tolist()):
            out[j, pos[i], sl] = ref[i, pos[i] + shift, sl]
            for q in range(pos[i] + 1, L):
                if 0 <= q - d[i] < L:
                    out[j, q, sl] = ref[i, q - d[i], sl]

    x, t, ctx, rows = _world_rows(obj)
    by_hand = denoise_with_kv_written(m, attn, ka, va, write, x, t, ctx)
    comps = interp.ComponentSet([m.space.parse(f"{MID}#kvs0"), m.space.parse(f"{MID}#kvs{h}")])
    kv = interp.ComponentSet([m.space.parse(f"{MID}#kv0"), m.space.parse(f"{MID}#kv{h}")])
    with torch.no_grad():
        eps = run_unet(m, x, t, ctx, compile_plan(m, comps), torch.tensor([[1.0, 0.0]]), tokens=rows)[0]
        only_kv = run_unet(m, x, t, ctx, compile_plan(m, kv), torch.tensor([[1.0, 0.0]]), tokens=rows)[0]
    torch.testing.assert_close(eps, by_hand, rtol=0, atol=1e-6)
    assert (eps - only_kv).abs().max() > 1e-6  # the later positions matter: the test can fail


def test_anchor_rows_stay_untouched_and_token_kv_is_unchanged(tiny_world_model, tiny_red_objective):
    m, obj = tiny_world_model, tiny_red_objective
    b = obj.token_binding()
    assert (b.mask <= b.span_mask).all() and (b.span_mask.sum(1) > b.mask.sum(1)).all()
    comps = m.components("tokenspan")
    plan = compile_plan(m, comps)
    x, t = obj.x_t, obj.t
    ctx = obj.ctx_anchor[obj.image_index]
    none = b.rows(torch.full((len(x),), -1))
    with torch.no_grad():
        assert torch.equal(run_unet(m, x, t, ctx, plan, torch.zeros(1, len(comps)), tokens=none)[0],
                           call_denoiser(m, x, t, ctx))
    from interp.core.tokens import bind

    b2 = bind(m, "red", ["a red circle on white", "a blue square on white"], strict=False)
    assert b2.span_mask[0].sum() > 1 and not b2.span_mask[1].any()


def test_one_path_is_token_kv_or_token_span_not_both(tiny_world_model):
    m = tiny_world_model
    with pytest.raises(ValueError, match=rf"{MID} appears both through token-KV \(#kv\) and token-span \(#kvs\)") as e:
        compile_plan(m, [f"{MID}#kv0", f"{MID}#kvs1"])
    assert "\n" not in str(e.value)
    other = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    plan = compile_plan(m, [f"{MID}#kv0", f"{other}#kvs1"])  # different cross-attentions: fine
    assert sorted(s.span for s in plan.denoiser) == [False, False, True, True]
    with pytest.raises(ValueError, match="appears both through token-KV units and as a layer"):
        compile_plan(m, [f"{MID}.to_k[0]", f"{MID}#kvs1"])


@pytest.mark.parametrize("method", ["coar", "maskgrad", "screen"])
def test_other_methods_attribute_token_span_units(tiny_world_model, tiny_red_objective, method):
    comps = tiny_world_model.components("tokenspan", block="mid_block")
    opts = {"coar": {"n_masks": 10}, "maskgrad": {"n_masks": 2}}.get(method, {})
    df = interp.attribute(method, tiny_world_model, "red", comps, objective=tiny_red_objective, **opts)
    main = df[df["variant"] == method] if "variant" in df else df
    assert list(main["component"]) == comps.addresses and main["score"].notna().all()
    assert set(main["granularity"]) == {"tokenspan"}


def test_tracing_refuses_and_joint_attention_is_refused(tiny_world_model, tiny_red_objective, tiny_family_models):
    comps = tiny_world_model.components("tokenspan", block="mid_block")
    with pytest.raises(ValueError, match="tracing does not handle \\['tokenspan'\\] granularity"):
        interp.attribute("tracing", tiny_world_model, "red", comps, objective=tiny_red_objective)
    m = tiny_family_models["sd3"]
    with pytest.raises(ValueError, match="tokenspan.*reads the text through joint attention.*attn_context") as e:
        m.components("tokenspan")
    assert "\n" not in str(e.value)
    with pytest.raises(UnknownComponentError, match="joint attention"):
        m.space.parse("transformer.transformer_blocks.0.attn#kvs0")


def test_generation_ablates_the_span_only_in_prompts_with_the_concept(tiny_world_model):
    from interp.core.generation import generate
    from interp.studies.editing.edits import AblationEdit

    m = tiny_world_model
    prompts = ["a red circle on white", "a blue square on white"]
    with torch.no_grad():
        plain = generate(m, prompts, steps=2, decode=False)
        with AblationEdit(tuple(m.components("tokenspan").addresses), concept="red").apply(m) as edited:
            ablated = edited.generate(prompts, steps=2, decode=False)
    assert not torch.equal(ablated[0], plain[0]) and torch.equal(ablated[1], plain[1])


@pytest.mark.slow  # ~15 s: a comparison and an end-to-end cell
def test_compare_methods_and_end_to_end_on_token_span_units(tiny_world_folder, tmp_path, refused, no_figures):
    import json

    import pandas as pd

    from analyses import compare_methods
    from analyses.end_to_end import main as end_to_end

    common = ["--model", str(tiny_world_folder), "--concepts", "red", "--images", "1", "--timesteps", "300",
              "--no-progress", "--threads", "1"]
    assert compare_methods.main([*common, "--granularity", "tokenspan", "--lds-alphas", "0.2", "--heldout-masks",
                                 "10", "--n-boot", "100", "--out", str(tmp_path / "run")]) == 0
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(df.granularity) == {"tokenspan"} and "tracing" not in set(df.method)
    assert {"ablation", "cad", "coar"} <= set(df.method)
    assert df[df.variant == "ablation"].component.nunique() == 14 and all("#kvs" in c for c in df.component)
    assert "do not attribute token-KV components" in refused(
        compare_methods.main, [*common, "--granularity", "tokenspan", "--methods", "ablation", "tracing",
                               "--out", str(tmp_path / "x")])
    out = tmp_path / "e2e"
    assert end_to_end(["--model", str(tiny_world_folder), "--concepts", "red", "--kinds", "token-span",
                       "--objectives", "one-step", "--methods", "cad", "ablation", "--blocks", "mid_block", "--k",
                       "1", "2", "--images", "6", "--steps", "2", "--attr-images", "1", "--random-masks", "2",
                       "--n-boot", "100", "--device", "cpu", "--no-progress", "--threads", "1",
                       "--out", str(out)]) == 0
    mat = pd.read_csv(out / "matrix.csv")
    assert set(mat["kind"]) == {"token-span"} and set(mat["method"]) == {"cad", "ablation"}
    ranking = json.loads((out / "cells" / "token-span__one-step" / "meta.json").read_text())["ranking_config"]
    assert ranking["granularity"] == "tokenspan"
    points = pd.read_parquet(out / "cells" / "token-span__one-step" / "results.parquet")
    assert set(points["k"]) >= {0, 1, 2}

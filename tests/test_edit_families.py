"""The closed-form edits on every model family (issue 36, item 4): UCE on the projections through which each
denoiser reads the text (cross-attention to_k/to_v of Stable Diffusion, SDXL and PixArt; the joint blocks' context
projections add_k_proj/add_v_proj of SD3 and FLUX), Diff-QuickFix on every text encoder's layer-0 self-attention
output projection (CLIP's out_proj, T5's SelfAttention.o), their refusals, and the edit command end to end (slow)."""

from __future__ import annotations

import importlib
import json

import pandas as pd
import pytest
import torch
from helpers import changed_weights

import interp
from interp.core.families import Family
from interp.studies.editing import edits as ed

U = importlib.import_module("interp.studies.editing.uce")  # the package re-exports the function uce under the same name

FAMILIES = ("sd1", "sdxl", "pixart", "sd3", "flux")
NEW = FAMILIES[1:]
pytestmark = pytest.mark.xdist_group("families")
KEEP = ["a photo of a blue square", "a green circle"]
#: The projections each family's UCE edits (module kinds) and the layer-0 projections Diff-QuickFix edits.
UCE_KINDS = {"sd1": ("attn2.to_k", "attn2.to_v"), "sdxl": ("attn2.to_k", "attn2.to_v"),
             "pixart": ("attn2.to_k", "attn2.to_v"), "sd3": ("attn.add_k_proj", "attn.add_v_proj"),
             "flux": ("attn.add_k_proj", "attn.add_v_proj")}
QUICKFIX = {
    "sd1": ["text_encoder.encoder.layers.0.self_attn.out_proj"],
    "sdxl": ["text_encoder.encoder.layers.0.self_attn.out_proj",
             "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj"],
    "pixart": ["text_encoder.encoder.block.0.layer.0.SelfAttention.o"],
    "sd3": ["text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
            "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj",
            "text_encoder_3.encoder.block.0.layer.0.SelfAttention.o"],
    "flux": ["text_encoder.encoder.layers.0.self_attn.out_proj",
             "text_encoder_2.encoder.block.0.layer.0.SelfAttention.o"],
}


def _outputs(model, paths, prompts, positions, latents, t) -> dict[str, torch.Tensor]:
    """Every projection's output (weight times its recorded input, no bias) at the prompts' positions, float64."""
    groups, cols = U.projection_inputs(model, paths, prompts, positions, latents, t)
    return {p: model.module(p).weight.detach().double() @ c for group, c in zip(groups, cols) for p in group}


@pytest.mark.parametrize("fam", FAMILIES)
def test_uce_on_every_family(tiny_family_models, fam):
    """UCE edits exactly the projections that read the text, solves each one's normal equations (the closed-form
    objective drops), moves the concept's outputs there towards the anchor's in the edited model (the inputs
    recorded again under the whole edit) and leaves the model bitwise as it was after its context."""
    m = tiny_family_models[fam]
    before = m.state_fingerprint()
    paths = U.cross_attention_projections(m)
    assert paths and all(p.split(".", 1)[0] == m.denoiser_part for p in paths)
    assert {p.split(".", p.count(".") - 1)[-1] for p in paths} == set(UCE_KINDS[fam])
    if fam == "flux":  # the single-stream blocks share their to_k/to_v between image and text: left alone
        assert not any("single_transformer_blocks" in p for p in paths)
    sols, info = U.uce_solutions(m, "red", preserve=KEEP)
    assert [p for p, _ in sols] == [p for p in paths if p in dict(sols)] and {p for p, _ in sols} == set(paths)
    for path, sol in sols:
        assert sol.residual() < 1e-10, path
        assert sol.objective(sol.W_star) < sol.objective(sol.W0), path
        assert (sol.W_star @ sol.C - sol.V).norm() < (sol.W0 @ sol.C - sol.V).norm(), path
    assert info["n_concept_states"] > 0 and info["n_preserve_states"] > 0
    edit = interp.studies.editing.uce(m, "red", preserve=KEEP)
    assert {u.param for u in edit.updates} == {f"{p}.weight" for p in paths}
    rec = edit.record()
    assert rec["modules"] == len(paths) and rec["max_normal_equation_residual"] < 1e-10
    json.dumps(rec, default=str)

    pairs = ed.quickfix_prompts(m, "red")
    cps, aps = [c for c, _ in pairs], [a for _, a in pairs]
    pos_c, pos_a = U.context_positions(m, "red", pairs)
    lat, t = U.record_latents(m, len(pairs), ed.EDIT_SEED)
    target = _outputs(m, paths, aps, pos_a, lat, t)  # the unedited model's outputs for the anchor
    orig = _outputs(m, paths, cps, pos_c, lat, t)
    with edit.apply(m):
        assert set(changed_weights(m, before)) == {u.param for u in edit.updates}
        edited = _outputs(m, paths, cps, pos_c, lat, t)
    assert not changed_weights(m, before)
    for p in paths:
        assert (edited[p] - target[p]).norm() < 0.9 * (orig[p] - target[p]).norm(), p
        # each projection was solved on the inputs it sees in the edited model (SD3's second block: what the edited
        # first block passes on), so its outputs there are the solution's, up to the weights' float32 rounding
        sol = dict(sols)[p]
        torch.testing.assert_close(edited[p], sol.W_star @ sol.C, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="inside"):
        with edit.apply(m):
            raise RuntimeError("inside")
    assert not changed_weights(m, before)


def test_uce_inputs_are_what_each_projection_sees(tiny_family_models):
    """SDXL's cross-attentions read both CLIPs' penultimate states side by side, unchanged: the recorded inputs are
    text_states' bit for bit. PixArt's read T5's states after the caption projection. SD3's joint blocks each read
    their own context stream: one group per block."""
    m = tiny_family_models["sdxl"]
    pairs = ed.quickfix_prompts(m, "red")
    C, _, _ = U.text_states(m, pairs, "red")
    assert C.shape[0] == m.denoiser.config.cross_attention_dim == sum(
        m.text_encoders[p].config.hidden_size for p in m.text_parts)
    pos_c, _ = U.context_positions(m, "red", pairs)
    lat, t = U.record_latents(m, len(pairs), 0)
    groups, cols = U.projection_inputs(m, U.cross_attention_projections(m), [c for c, _ in pairs], pos_c, lat, t)
    assert len(groups) == 1 and torch.equal(cols[0], C)

    m = tiny_family_models["pixart"]
    pairs = ed.quickfix_prompts(m, "red")
    pos_c, _ = U.context_positions(m, "red", pairs)
    lat, t = U.record_latents(m, len(pairs), 0)
    groups, cols = U.projection_inputs(m, U.cross_attention_projections(m), [c for c, _ in pairs], pos_c, lat, t)
    assert len(groups) == 1
    with torch.no_grad():
        states = interp.core.interventions.run_text(m, m.tokenize([c for c, _ in pairs]))[0]
        proj = m.denoiser.caption_projection(interp.core.families.unpack(states, m.layout)[0]).double()
    torch.testing.assert_close(cols[0], torch.cat([proj[i, p] for i, p in enumerate(pos_c)]).T)
    mask = m.tokenize([c for c, _ in pairs]) != m.tokenizer.pad_token_id  # T5 padding is masked: never a column
    assert all(mask[i, p].all() for i, p in enumerate(pos_c))

    m = tiny_family_models["sd3"]
    groups, _ = U.projection_inputs(m, U.cross_attention_projections(m), ["a red circle"], [[0, 1]],
                                    *U.record_latents(m, 1, 0))
    assert groups == [[f"transformer.transformer_blocks.{b}.attn.add_k_proj",
                       f"transformer.transformer_blocks.{b}.attn.add_v_proj"] for b in range(2)]


@pytest.mark.parametrize("fam", FAMILIES)
def test_diff_quickfix_on_every_family(tiny_family_models, fam):
    """Diff-QuickFix rewrites every text encoder's layer-0 self-attention output projection (CLIP's out_proj, T5's
    SelfAttention.o) so that the concept's keys give the anchor's outputs (the objective drops), and restores the
    model bitwise."""
    m = tiny_family_models[fam]
    before = m.state_fingerprint()
    assert ed.quickfix_module_paths(m) == QUICKFIX[fam]
    solutions = ed.diff_quickfix_solutions(m, "red", preserve=2)
    assert [i["module"] for _, i in solutions] == QUICKFIX[fam]
    for sol, info in solutions:
        assert sol.residual() < 1e-10 and info["n_keys"] > info["n_preserve_keys"] > 0
        n = info["n_concept_keys"]  # the concept's keys (the preserved prompts' follow, with their own outputs)
        K, V = sol.K[:, :n], sol.V[:, :n]
        assert (sol.W_star @ K - V).norm() < 0.9 * (sol.W0 @ K - V).norm(), info["module"]
    edit = ed.diff_quickfix(m, "red")
    assert [u.param for u in edit.updates] == [f"{p}.weight" for p in QUICKFIX[fam]]
    rec = edit.record()
    assert rec["n_weights"] == edit.n_changed and ("per_encoder" in rec) == (len(QUICKFIX[fam]) > 1)
    json.dumps(rec, default=str)

    # in the edited model, the concept's keys (layer 0's attention, which the edit does not change) give outputs
    # nearer the anchor's
    sol_by = {i["module"]: (sol, i) for sol, i in ed.diff_quickfix_solutions(m, "red")}
    with edit.apply(m):
        assert set(changed_weights(m, before)) == {u.param for u in edit.updates}
        for path, (sol, _) in sol_by.items():
            W = m.module(path).weight.detach().double()
            torch.testing.assert_close(W, sol.W_star.to(W.dtype).double())
            assert (W @ sol.K - sol.V).norm() < 0.9 * (sol.W0 @ sol.K - sol.V).norm()
    assert not changed_weights(m, before)


def test_quickfix_keys_of_a_t5_encoder_cover_the_whole_prompt(tiny_family_models):
    """T5 attends both ways, so its keys start before the subject (matched to the same anchor position); PixArt's
    T5 padding, masked in T5 and in the transformer, gives no key."""
    m = tiny_family_models["pixart"]
    pairs = [("a photo of red", "a photo of")]
    K, V, W0, info = ed.quickfix_keys_values(m, pairs, "red")
    real = len(m.tokenizer("a photo of red").input_ids)  # a, photo, of, red, </s>
    assert info["n_concept_keys"] == real == K.shape[1]
    m = tiny_family_models["sd3"]
    K, _, _, info = ed.quickfix_keys_values(m, pairs, "red", part="text_encoder_3")
    assert info["n_concept_keys"] == m.encoders[2].length  # SD3 passes no mask: every position, padding too
    K, _, _, info = ed.quickfix_keys_values(m, pairs, "red", part="text_encoder")
    bos_a_photo_of = 4  # CLIP is causal: from the subject on
    assert info["n_concept_keys"] == m.encoders[0].length - bos_a_photo_of


def test_cad_and_component_sets_on_the_transformers(tiny_family_models):
    """CAD scores the transformers' feed-forward matrices (ff.net.0's input projection and ff.net.2); the edit
    command's component sets resolve per family (SD3's attn2 is its context stream's values)."""
    from interp.core.objectives import ObjectiveConfig

    m = tiny_family_models["pixart"]
    ws = ed.cad_weight_scores(m, interp.text_concept("red"), "erase",
                              ObjectiveConfig(kind="erase", n_images=4, timesteps=(500,), gen_steps=2))
    names = set(ws.scores)
    assert names == {f"transformer.transformer_blocks.{b}.ff.net.{k}.weight" for b in range(2)
                     for k in ("0.proj", "2")}
    assert ws.edit(0.1).n_changed > 0
    sd3 = tiny_family_models["sd3"]
    values = ed.edit_components(sd3, ["attn2"])
    assert len(values) > 0 and all(c.module.endswith(".attn.add_v_proj") for c in values)
    assert len(ed.edit_components(sd3, ["ff"])) > 0
    texts = ed.edit_components(sd3, ["text-mlp"])
    assert {c.address.split(".", 1)[0] for c in texts} == set(sd3.text_parts)
    assert len(ed.edit_components(tiny_family_models["sd1"], ["attn2", "attn2-heads", "text-mlp", "ff"])) > 0


def test_refusals_name_the_family(tiny_family_folders, monkeypatch):
    """A family whose text-reading projections UCE does not know, a text encoder Diff-QuickFix does not know and a
    component set a family lacks are refused in one line naming the family and why."""
    from interp.studies.editing.uce import cross_attention_projections, uce

    m = interp.load_model(str(tiny_family_folders["pixart"]), device="cpu")

    class Sana(Family):
        name, label, denoiser = "sana", "SANA", "transformer"

    m.family = Sana()
    with pytest.raises(ValueError, match=r"^UCE does not know through which projections the SANA denoiser "
                                         r"\(PixArtTransformer2DModel\) reads the text"):
        cross_attention_projections(m)
    with pytest.raises(ValueError, match="the SANA denoiser"):
        uce(m, "red")

    # its second encoder made one of no known architecture
    m = interp.load_model(str(tiny_family_folders["sdxl"]), device="cpu")
    m.text_encoders["text_encoder_2"] = torch.nn.Linear(2, 2)
    m.space.modules = {p: i for p, i in m.space.modules.items() if not p.startswith("text_encoder_2.")}
    with pytest.raises(ValueError, match=r"Diff-QuickFix edits the layer-0 self-attention output projection of CLIP "
                                         r"and T5 text encoders; the Stable Diffusion XL pipeline's text_encoder_2 is "
                                         r"a Linear"):
        ed.diff_quickfix(m, "red")

    m = interp.load_model(str(tiny_family_folders["sd3"]), device="cpu")
    with pytest.raises(ValueError, match=r"component set attn2-heads: the Stable Diffusion 3/3.5 transformer has no "
                                         r"cross-attention; its joint attention's heads"):
        ed.edit_components(m, ["attn2-heads"])


def test_edit_concepts_refuses_before_any_work(tiny_family_folders, tmp_path, refused, monkeypatch):
    """The edit command refuses an edit the model's family does not take before the baseline is generated."""
    from analyses.edit_concepts import main

    monkeypatch.setattr(U, "READERS", {k: v for k, v in U.READERS.items() if k != "pixart"})
    base = ["--judge", "concept-world-clip", "--concepts", "red", "--alternatives", "blue", "--images", "3",
            "--steps", "1", "--attr-images", "1", "--threads", "1", "--no-progress"]
    out = tmp_path / "uce"
    line = refused(main, ["--model", str(tiny_family_folders["pixart"]), "--edits", "cad-erase", "uce", *base,
                          "--out", str(out)])
    assert "UCE does not know through which projections the PixArt-α/Σ denoiser" in line, line
    assert not (out / "tables").exists()
    out = tmp_path / "heads"
    line = refused(main, ["--model", str(tiny_family_folders["flux"]), "--edits", "coar-edit", "--components",
                          "attn2-heads", *base, "--out", str(out)])
    assert "component set attn2-heads: the FLUX.1 transformer has no cross-attention" in line, line
    assert not (out / "tables").exists()


# -- slow: the commands end to end on every new family -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fam", NEW)
def test_edit_concepts_runs_on_every_family(tiny_family_folders, tmp_path, fam):
    from analyses.edit_concepts import main

    out = tmp_path / "run"
    edits = ["cad-erase", "diff-quickfix", "diff-quickfix-preserve", "uce", "coar-edit", "ablate:maskgrad"]
    assert main(["--model", str(tiny_family_folders[fam]), "--judge", "concept-world-clip", "--concepts", "red",
                 "--alternatives", "blue", "green", "--edits", *edits, "--k", "2", "--ratios", "0.1",
                 "--components", "ff", "attn2", "--images", "6", "--steps", "2", "--attr-images", "1",
                 "--attr-steps", "2", "--max-batch", "4", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    table = pd.read_csv(out / "tables" / "tradeoff.csv")
    assert set(table["edit"]) == set(edits)
    assert json.loads((out / "meta.json").read_text())["model_unchanged"] is True
    records = {r["edit"]: r for r in json.loads((out / "edits.json").read_text())}
    assert records["uce"]["n_weights"] > 0 and records["diff-quickfix"]["n_weights"] > 0
    assert set(records["diff-quickfix"]["weights"]) == {f"{p}.weight" for p in QUICKFIX[fam]}
    for f in ("index.html", "tables/per_value.csv", "tables/edits.csv", "figures/tradeoff.png", "figures/grid-red.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f


@pytest.mark.slow
@pytest.mark.parametrize("fam", NEW)
def test_erasure_curves_run_on_every_family(tiny_family_folders, tmp_path, fam):
    from analyses.erasure_curves import main

    out = tmp_path / "run"
    block = "down_blocks.1" if fam == "sdxl" else "transformer_blocks"
    assert main(["--model", str(tiny_family_folders[fam]), "--judge", "concept-world-clip", "--concepts", "red",
                 "--alternatives", "blue", "green", "--methods", "cad", "maskgrad", "--blocks", block, "--k", "1", "4",
                 "--images", "6", "--steps", "2", "--random-rankings", "1", "--random-masks", "2", "--n-boot", "100",
                 "--attr-images", "1", "--timesteps", "300", "--max-batch", "4", "--device", "cpu", "--no-progress",
                 "--threads", "1", "--out", str(out)]) == 0
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert json.loads((out / "meta.json").read_text())["model_unchanged"] is True
    curves = pd.read_parquet(out / "results.parquet")
    assert {"cad", "maskgrad"} <= set(curves["method"]) and set(curves["k"]) >= {0, 1, 4}

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Editing: erase and amplify a concept
#
# Attributions are only as good as what you can do with them. The most direct use: remove the components that
# carry a concept and check that the model stops drawing it, **and nothing else**. `interp.studies.editing` builds edits
# from attributions and judges them on held-out prompts and seeds with the concept classifier:
#
# - `cad_erase` / `cad_amplify` (Nguyen et al. 2024): score every weight of the UNet's feed-forward matrices with
#   `w * dJ/dw` and zero, in every row, the top `floor(ratio * in_features)` entries (most positive on the erase
#   objective; most negative on the amplify objective);
# - `rank_components(...).top(k)`: ablate the `k` highest-scoring components of any attribution method (here the
#   UNet's feed-forward hidden units);
# - `diff_quickfix` (Basu et al., ICLR 2024): a closed-form rewrite of one projection in the text encoder's first
#   layer, so that the concept's tokens read like the prompt without the concept (optionally, `preserve=n`, also
#   keeping the outputs for `n` prompts without the concept).
#
# An edit is a frozen record of what to change; `with edit.apply(model) as edited:` is the only place it takes
# effect, and the model is bitwise the same afterwards.
#
# `SMALL` (set by the test suite) uses a few held-out images and one budget per edit; without it, 96 held-out images
# per evaluation and a sweep of budgets (a few minutes on a laptop CPU).

# %%
# %matplotlib inline
from dataclasses import replace

import interp
from interp.notebook import notebook_setup

SMALL = notebook_setup()  # quiet library chatter; the tests set a small configuration

import matplotlib.pyplot as plt
import pandas as pd
import torch

import interp.studies.editing as editing
from interp.core.objectives import ObjectiveConfig
from interp.world.vocab import attribute_of

model = interp.load_model("concept-world")
print("small configuration" if SMALL else "full configuration")

# %% [markdown]
# ## The held-out evaluation
#
# Edits are computed from one set of prompts (the attribution objective's) and judged on another: captions of
# scenes from a seed stream nothing else uses, with fixed initial noises, so an image before and after an edit
# differs by the edit alone. Three sets of prompts: **target** (full captions with the concept, "a red striped
# circle on white"), **alone** (only the concept named, "a photo of a red shape") and **other** (captions without
# the concept: the specificity set). The unedited model's images are generated once and shared by every edit.

# %%
CONCEPT = "red"
ecfg = editing.EvalConfig.from_total(16 if SMALL else 96, steps=6 if SMALL else 10)
acfg = (ObjectiveConfig(kind="erase", n_images=2, timesteps=(250, 600)) if SMALL
        else ObjectiveConfig(kind="erase", n_images=8, timesteps=(100, 300, 500, 700, 900)))
base = editing.baseline(model, CONCEPT, ecfg)
print(base.held.prompts.groupby("set")["prompt"].agg(["count", "first"]))
unedited = editing.evaluate_edit(model, None, CONCEPT, base=base).summary
print(f"unedited: '{CONCEPT}' drawn on {unedited['target_before'].iat[0]:.0%} of its prompts; the other values on "
      f"{unedited['other_before'].iat[0]:.0%} of theirs")

# %% [markdown]
# ## Three ways to erase "red"
#
# Each edit is computed once per budget. CAD's weight scores are computed once and cut at several ratios; the
# ranking of hidden units (here by the mask-averaged gradient, `maskgrad`, which notebook 2 compares with true
# ablation) once and cut at several `k`.

# %%
fingerprint = model.state_fingerprint()

ratios = (0.1,) if SMALL else (0.02, 0.05, 0.1)
ks = (16, 64) if SMALL else (16, 64, 256)

weight_scores = editing.cad_weight_scores(model, CONCEPT, "erase", acfg)
ranking = editing.rank_components(model, CONCEPT, "maskgrad", objective=acfg, n_masks=4 if SMALL else 12)
edits = [weight_scores.edit(r) for r in ratios]
edits += [ranking.top(k) for k in ks]
edits += [editing.diff_quickfix(model, CONCEPT)]
# the same closed form, plus 32 prompts without the concept whose outputs the rewrite must keep (not in the paper)
edits += [replace(editing.diff_quickfix(model, CONCEPT, preserve=32), name="diff-quickfix+preserve")]
for e in edits:
    r = e.record()
    size = f"{r['n_components']} components" if r["n_components"] is not None else f"{r['n_weights']} weights"
    print(f"{e.label:32} changes {size:18} computed in {r['seconds']:.1f} s")

# %% [markdown]
# Using an edit: inside the context, generation (through `edited.generate`, or any function of the suite given
# `edited.intervention`) sees the edited model. Outside, nothing changed:

# %%
prompt = ["a red solid circle on black", "a blue solid circle on black"]
latents = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(1))
with edits[-2].apply(model) as edited:  # ablate the top-k units
    after = edited.generate(prompt, latents=latents, steps=ecfg.steps)
before = interp.generate(model, prompt, latents=latents, steps=ecfg.steps)
fig, axes = plt.subplots(1, 4, figsize=(7, 2))
for ax, im, title in zip(axes, [*before, *after], [f"before:\n{p}" for p in prompt] + [f"after:\n{p}" for p in prompt]):
    ax.imshow(im.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("off")
plt.show()
unchanged = all(torch.equal(p, fingerprint[n]) for n, p in model.parameters())
print("weights bitwise unchanged:", unchanged)

# %% [markdown]
# ## Judge every edit
#
# For each edit: how often the classifier still sees the concept on its prompts (`target_after`, lower is better
# for erasing) and how much of the other values survives: `retained_rate` is after / before averaged over every
# other value of every attribute (1 = untouched), `retained_drawn` the same over the values the unedited model draws
# reliably (a before-rate of at least 50%; a ratio over a value the model rarely gets right is noise, and can be far
# above 1), `retained_same_attribute` over the other values of the concept's own attribute (the other colors, when
# erasing red). `fd_*` is a Frechet distance of classifier features to renders of the same scenes, an image-quality
# proxy: compare after with before.

# %%
evals = [editing.evaluate_edit(model, e, CONCEPT, base=base) for e in edits]
table = editing.sweep_table(evals)
table[["label", "budget", "target_before", "target_after", "target_alone_after", "retained_rate", "retained_drawn",
       "retained_same_attribute", "fd_before", "fd_after", "edit_seconds"]].round(3)

# %%
for r in table.itertuples():
    print(f"{r.label:28} '{CONCEPT}' {r.target_before:4.0%} -> {r.target_after:4.0%} of its prompts; the values the "
          f"model draws reliably kept at {r.retained_drawn:.2f}x their rate, the other {attribute_of(CONCEPT)}s at "
          f"{r.retained_same_attribute:.2f}x")

# %% [markdown]
# ## Before and after
#
# The same prompts and seeds, unedited in the first row, then one row per edit (its largest budget): the left half
# are target prompts, the right half other prompts. A specific edit changes the left half only; where the right
# half changes too (other colors replaced, shapes or textures altered), the edit is not specific, whatever its
# effect on the target.

# %%
largest = {}
for e in evals:
    largest[e.record["edit"]] = e  # evaluations are in budget order: the last one per edit is the largest budget
editing.image_grid(list(largest.values()), n=8 if SMALL else 12)

# %% [markdown]
# ## The trade-off
#
# Every point is one edit at one budget: the concept's rate after the edit (y) against the retained rate of
# the values the model draws reliably (x, `retained_drawn`). The unedited model is the star at (1, its rate). A
# perfect erasure goes straight down from it: the concept gone, everything else kept. Points to the left destroyed
# other values along the way (points right of 1: drawn more often than before, read them as "kept"). The line
# through a method's budgets is its trade-off.

# %%
editing.tradeoff_plot(table, x="retained_drawn")

# %% [markdown]
# What the three kinds of edit say about the model:
#
# - **Ablating feed-forward units** tests whether the concept is *stored* in them. If even hundreds of the
#   highest-ranked units leave the concept in place, it is carried redundantly (notebook 2 measured how much less a
#   joint ablation removes than the single ablations add up to) or elsewhere: the cross-attention that reads the
#   text, or the text states themselves. Try `rank_components(..., components=model.components("head",
#   family="attn2"))` to ablate cross-attention heads instead.
# - **CAD-Erase** zeroes a fraction of the weights of every feed-forward row: a much larger, distributed change
#   than a handful of units, so it shifts the concept more, and touches more of everything else.
# - **Diff-QuickFix** edits the text encoder at the state where Basu et al.'s causal tracing localizes a concept in
#   Stable Diffusion (layer 0, from the concept's token on; notebook 3 traces the concept world): the states are
#   rewritten to read like the prompt without the concept, so it disappears at the source. A text
#   encoder as narrow as the concept world's (64 features) has little room to separate one color word from the
#   others, so rewriting one can move its neighbors too; `preserve=n` adds keys of prompts without the concept
#   that must keep their outputs: compare the two rows.

# %% [markdown]
# ## Amplifying a concept
#
# The opposite edit: CAD-Amplify scores the weights on the **amplify** objective (the negative denoising loss on
# images of the concept: higher = the concept is modelled better) and zeroes the most negative ones, the weights
# that work *against* drawing it. There is only room for it where the model draws the concept unreliably: diamond
# is the shipped model's weakest value (86% in its `fidelity.json`), so we amplify "diamond". Watch the "alone"
# prompts ("a photo of a diamond"), where nothing else in the prompt helps, and the image-quality proxy (`fd_after`
# against `fd_before`): zeroing weights can also just damage the images.

# %%
AMPLIFY = "diamond"
amp_cfg = ObjectiveConfig(kind="amplify", n_images=acfg.n_images, timesteps=acfg.timesteps)
amp_base = editing.baseline(model, AMPLIFY, ecfg)
amp_scores = editing.cad_weight_scores(model, AMPLIFY, "amplify", amp_cfg)
amp_evals = [editing.evaluate_edit(model, amp_scores.edit(r), AMPLIFY, base=amp_base) for r in ratios[-2:]]
amp_table = editing.sweep_table(amp_evals)
amp_table[["label", "budget", "target_before", "target_after", "target_alone_before", "target_alone_after",
           "retained_drawn", "fd_before", "fd_after"]].round(3)

# %%
editing.image_grid(amp_evals[-1:], n=8 if SMALL else 12)

# %% [markdown]
# Things to try: other concepts (`"circle"`, `"white"`), `editing.coar_edit` (components whose attributions are
# specific to the target against the other values of its attribute), or any registered method in
# `rank_components` (true ablation is the most faithful ranking and the most expensive). The full comparison of
# edits is `python -m analyses.edit_concepts`.

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
# # 2. Comparing methods against true ablation
#
# Every attribution method claims to know which components carry a concept. On a model this small we can check:
# **true ablation** (remove one component, measure how much the objective J drops) is affordable for hundreds of
# components, and it is the ground truth the other methods estimate. This notebook runs five methods on **the same
# components, the same objective and the same evaluation samples**, and compares them with it:
#
# | method | what it computes | cost |
# |---|---|---|
# | `ablation` | J(intact) - J(component ablated), measured for each component alone | one forward pass per component |
# | `cad` | `w * dJ/dw` summed over the component's weights: the first-order Taylor estimate of that drop | one backward pass |
# | `maskgrad` | `dJ/dm` averaged over random masks that ablate ~5% of the components: first order, but around a partly ablated model | K forward + backward passes |
# | `coar` | a linear regression from random ablation masks to J; the coefficients are the scores | M forward passes |
# | `tracing` | corrupt the concept's words, restore one component's clean state, measure the fraction of J that returns | one forward pass per component and noise draw |
#
# `SMALL` (set by the test suite) uses the 64 output neurons of one feed-forward layer and a tiny evaluation set;
# without it, the 448 feed-forward output neurons of the whole UNet (the set of the main comparison job,
# `python -m analyses.compare_methods`), which takes about two minutes on a laptop CPU.

# %%
# %matplotlib inline
import time

import interp
from interp.notebook import notebook_setup

SMALL = notebook_setup()  # quiet library chatter; the tests set a small configuration

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import interp.report.evaluation
import interp.report.plots
import interp.studies.editing
from interp.core.objectives import ObjectiveConfig

model = interp.load_model("concept-world")
print("small configuration" if SMALL else "full configuration")

# %% [markdown]
# ## One component set, one objective, one evaluation set
#
# The components: output neurons of the feed-forward blocks (`ff.net.2[i]`, one feature of the block's output
# written back to the residual stream). The objective: CAD's erase objective for "red" on a fixed, seeded set of
# noised renders. Building the `Objective` once and handing it to every method guarantees they all explain the
# same numbers.

# %%
CONCEPT = "red"
comps = model.components("neuron", family="ff", kind="ff.net.2", block="mid_block" if SMALL else None)
cfg = ObjectiveConfig(kind="erase", n_images=2 if SMALL else 4, timesteps=(250, 600))
obj = interp.Objective(model, CONCEPT, cfg)
print(f"{len(comps)} components in layers {sorted({c.layer for c in comps})}")
print(f"evaluation set: {obj.n_samples} samples (images x timesteps); J(intact) = {float(obj.intact.mean()):.4f}")

# %% [markdown]
# ## Run the five methods
#
# `interp.attribute(name, model, concept, components, objective=..., **options)` runs any registered method; the
# options are the method's own (number of masks, ablation rate, noise draws). Every call returns the same tidy
# table, and `df.attrs["meta"]` records what it cost. Causal tracing also draws layer maps, which notebook 3 is
# about; here we only need its per-component scores (`maps=False`).

# %%
n = len(comps)
options = {
    "ablation": {},
    "cad": {},
    "maskgrad": {"n_masks": 8 if SMALL else 12, "alpha": 0.05},
    "coar": {"n_masks": 100 if SMALL else 2 * n, "alpha": 0.05},
    "tracing": {"n_noise": 1 if SMALL else 2, "maps": False},
}
frames = {}
for method, opts in options.items():
    t0 = time.perf_counter()
    frames[method] = interp.attribute(method, model, CONCEPT, comps, objective=obj, **opts)
    print(f"{method:>9}: {time.perf_counter() - t0:6.1f} s")
results = pd.concat(frames.values(), ignore_index=True)

cost = pd.DataFrame([{"method": m, **f.attrs["meta"]["cost"]} for m, f in frames.items()]).set_index("method")
cost.round(1)

# %% [markdown]
# (A "pass" is one evaluation of J over the whole evaluation set.) The result is one long table: five rows per
# component, one per method.

# %%
results.pivot_table(index="component", columns="method", values="score").head()

# %% [markdown]
# ## Each method against true ablation
#
# One panel per method: its score (y) against the measured single-ablation effect (x) of the same component.
# Points on a line through the origin mean the method predicts the measured effect; the title gives Pearson's r
# (agreement of values) and Spearman's rho (agreement of the ranking).

# %%
interp.report.plots.scatter_vs_reference(results, CONCEPT)

# %% [markdown]
# The same numbers with bootstrap 95% confidence intervals (components resampled), and how many of the true top
# 5% / 10% components each method puts in its own top 5% / 10% (`chance` = what a random ranking gets):

# %%
corr = interp.report.evaluation.correlations(results, reference="ablation", n_boot=200 if SMALL else 1000)
corr[["method", "n", "pearson", "pearson_lo", "pearson_hi", "spearman", "spearman_lo", "spearman_hi",
      "kendall"]].round(3)

# %%
for sentence in interp.report.evaluation.summary_sentences(corr):
    print(sentence)
topk = interp.report.evaluation.topk_agreement(results, fractions=(0.05, 0.1))
topk.pivot_table(index=["side", "fraction", "k"], columns="method", values="precision").round(2)

# %% [markdown]
# ## Where does each method put the concept?
#
# `interp.report.plots.localization_heatmap` shows, per layer, the share of a method's total |score| that is positive
# (supports the concept) and negative (suppresses it). It draws one column per concept; relabelling the tidy
# table's `concept` column with the method puts the five methods side by side for our one concept.

# %%
by_method = results.assign(concept=results["variant"], method="all methods", variant="all methods")
interp.report.plots.localization_heatmap(by_method, "all methods")

# %% [markdown]
# And the agreement with true ablation inside each layer (a method can rank layers right and units within a layer
# wrong, or the reverse):

# %%
by_layer = interp.report.evaluation.correlations_by_layer(results, n_boot=0)
by_layer.pivot_table(index=["depth", "layer"], columns="method", values="spearman").round(2)

# %% [markdown]
# ## Single ablations vs joint ablations
#
# True ablation removes **one** component at a time. An edit removes many together, and then effects need not
# add up: two units that back each other up each look unimportant alone (saturation), and units can also amplify
# each other. So take each method's top 5% of components, ablate them *together* (through the editing package's
# `AblationEdit`, which ablates through the same multipliers, never touching a weight), and compare the measured
# drop of J with two predictions: the method's own sum of scores, and the sum of the true single-ablation effects.
# All three are in percent of J(intact).

# %%
k = max(2, round(0.05 * n))
j_intact = float(obj.intact.mean())
truth = frames["ablation"].set_index("component")["score"]
rows = []
for method, df in frames.items():
    edit = interp.studies.editing.Ranking.from_frame(df, side="positive").top(k)  # its k highest-scoring components
    with edit.apply(model) as edited:
        j_joint = float(obj.mean(edited.plan, edited.mult)[0])
    chosen = list(edit.components)
    own = df.set_index("component")["score"][chosen].sum()
    rows.append({
        "method": method, "k": len(chosen),
        # tracing's scores are restored fractions, not changes of J: no prediction of its own
        "own prediction (sum of its scores)": np.nan if method == "tracing" else 100 * own / j_intact,
        "sum of single-ablation effects": 100 * truth[chosen].sum() / j_intact,
        "measured joint drop": 100 * (j_intact - j_joint) / j_intact,
    })
joint = pd.DataFrame(rows).set_index("method")
joint.round(2)

# %% [markdown]
# COAR is fitted on joint ablations to begin with; its own held-out check, the linear datamodeling score (LDS:
# correlation of predicted and measured J over random masks it never trained on), is in its metadata:

# %%
meta = frames["coar"].attrs["meta"]
print(f"COAR: {meta['n_train']} training masks, {meta['n_test']} held-out masks, "
      f"LDS Spearman {meta['lds_spearman']:.2f}, Pearson {meta['lds_pearson']:.2f}")

# %% [markdown]
# ## What the disagreements mean
#
# - **First order vs measured.** CAD is a gradient at the intact model: `w * dJ/dw` is the first term of a Taylor
#   series for the effect of setting `w` to zero. It is exact when J is linear in the component over the whole way
#   from intact to ablated, and misleading when it is not: a unit on the flat part of a nonlinearity has a small
#   gradient but a large ablation effect, and a unit whose effect saturates has a large gradient but a small
#   effect. CAD's ranking can agree with true ablation (high Spearman) while its values do not (points off the
#   diagonal), and it is then still useful for picking components, less for predicting how much an edit removes.
# - **Around which model.** `maskgrad` takes the same gradient, but averaged over models with ~5% of the components
#   already ablated: it linearizes J where edits operate. When it agrees better with true ablation than CAD, the
#   gap between them is the nonlinearity of J in that direction.
# - **Joint vs single ablations.** True single ablation is the ground truth *for one component at a time*. COAR
#   (regression on random joint masks) and maskgrad estimate the average effect of a component *in the company of
#   other ablations*; where the joint drop in the last table differs from the sum of single effects, components
#   interact, and a method fitted to joint ablations can be right about the edit while disagreeing with the
#   single-ablation reference. Which reference matters depends on the question: "what does this unit do?" (single)
#   or "what happens if I remove these?" (joint).
# - **A different question.** Causal tracing does not ask what a component contributes to the concept in the clean
#   run, but how much of the concept its clean state restores after the concept's words were corrupted: a
#   component can be essential to the concept in the clean run and still restore little on its own, when the
#   corruption also reaches other paths. Low correlation with ablation is expected and is not an error of the
#   method; notebook 3 shows what tracing is good at: *where* (which layer, which token) the concept is read in.
# - **Noise.** All of these numbers come from a finite evaluation set (`cfg`); the confidence intervals above are
#   over components, not over evaluation samples. Each method's `stderr` column holds the standard error of its
#   own scores.

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
# # 1. Quickstart: where does the model keep "red"?
#
# The suite asks one question of a text-to-image diffusion model: *which of its components make it draw a
# concept?* This notebook walks through the whole loop once, on the model shipped with the package:
#
# 1. load the **concept world**, a small text-to-image model trained from scratch on a toy world of 16x16 images;
# 2. look at what it draws;
# 3. list its components (neurons, attention heads, layers) and read an address;
# 4. run one attribution method, **CAD**, for one concept, and see in which layers it puts the concept.
#
# `SMALL` (the test suite sets `INTERP_NOTEBOOK_SMALL=1`) picks a small evaluation set so the notebook runs in
# seconds; without it the sizes are what you would use, and it still runs in about a minute on a laptop CPU.

# %%
# %matplotlib inline
import interp
from interp.notebook import notebook_setup

SMALL = notebook_setup()  # quiet library chatter; the tests set a small configuration

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import interp.report.plots
from interp.core.objectives import ObjectiveConfig
from interp.world.concepts import world_concept
from interp.world.render import ConceptWorld
from interp.world.vocab import ATTRIBUTES, TEMPLATES

print("small configuration" if SMALL else "full configuration")

# %% [markdown]
# ## The concept world
#
# Every image shows one object with four attributes, each from a fixed set of words. Captions are built from a few
# templates (any attribute word may be left out). The model is a real diffusers `UNet2DConditionModel` conditioned
# on a real `CLIPTextModel`, just small: it denoises 16x16 pixels directly (there is no VAE).

# %%
for attribute, values in ATTRIBUTES.items():
    print(f"{attribute:>10}: {', '.join(values)}")
print()
for t in TEMPLATES:
    print("template:", t)

# %% [markdown]
# `interp.load_model("concept-world")` loads the shipped checkpoint. The same call takes a Stable Diffusion folder
# or hub id (notebook 5). Besides the pipeline's parts, the concept world comes with a **concept classifier**, a
# small CNN trained on the renderer's images, which judges what generated images show.

# %%
model = interp.load_model("concept-world")
print(type(model.unet).__name__, f"{sum(p.numel() for p in model.unet.parameters()):,} parameters")
print(type(model.text_encoder).__name__, f"{sum(p.numel() for p in model.text_encoder.parameters()):,} parameters")
print(type(model.scheduler).__name__, "| concept classifier:", type(model.classifier).__name__)

# %% [markdown]
# ## What it draws
#
# `interp.generate` runs the sampling loop (DDIM with classifier-free guidance) from seeded noise and returns images
# in [0, 1]. Above each sample we print what the concept classifier sees in it. The top row is the renderer's
# ground truth for comparison: images the model was trained to produce.
#
# The model is small and was trained from scratch on a CPU, so it is not perfect: where the classifier's
# verdict differs from the prompt, the model got that attribute wrong. Its measured fidelity per attribute and per
# value (on held-out captions) is stored next to its weights, in `interp/world/assets/concept-world/fidelity.json`.
# Colors are among what it draws most reliably, which is why the notebooks use "red" as their running example.

# %%
prompts = ["a red solid circle on black", "a blue striped square on white", "a photo of a yellow hollow triangle"]
if not SMALL:
    prompts += ["a green striped cross on black", "a picture of a purple solid diamond on white", "a cyan circle"]
n_seeds = 2 if SMALL else 4
steps = 10 if SMALL else 25

batch = [p for p in prompts for _ in range(n_seeds)]
images = interp.generate(model, batch, seed=0, steps=steps)
probs = model.classifier.predict(images)  # per attribute: (n_images, n_values) probabilities
seen = [" ".join(ATTRIBUTES[a][int(probs[a][i].argmax())] for a in ("color", "texture", "shape", "background"))
        for i in range(len(images))]

truth = torch.stack([ConceptWorld(n_seeds, seed=1, color="red", shape="circle", texture="solid",
                                  background="black")[i]["image"] for i in range(n_seeds)])
fig, axes = plt.subplots(len(prompts) + 1, n_seeds, figsize=(1.9 * n_seeds + 2.6, 1.9 * (len(prompts) + 1)),
                         squeeze=False)
for j in range(n_seeds):
    axes[0][j].imshow(truth[j].permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[0][j].set_title("a render", fontsize=8)
axes[0][0].set_ylabel("renderer:\nred solid\ncircle on black", rotation=0, ha="right", va="center", fontsize=8)
for i, p in enumerate(prompts):
    for j in range(n_seeds):
        k = i * n_seeds + j
        axes[i + 1][j].imshow(images[k].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[i + 1][j].set_title(f"sees: {seen[k]}", fontsize=7)
    axes[i + 1][0].set_ylabel(p.replace(" on ", "\non "), rotation=0, ha="right", va="center", fontsize=8)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Components
#
# A **component** is anything the methods attribute to: a whole layer, a neuron (an output feature of a linear
# layer, a hidden unit of a feed-forward block, a channel of a convolution), an attention head, or a single
# weight. Each has an address: the module's real path inside the model, plus `[i]` for a unit. Components come in
# families: in the UNet self-attention `attn1`, cross-attention `attn2`, feed-forward `ff`, ResNet blocks `resnet`
# and whole transformer blocks `block`; in the text encoder `text_attn`, `text_mlp` and `text_layer`.
#
# How many of each, per granularity:

# %%
families = model.space.families()
counts = pd.DataFrame({g: {f: model.space.count(g, family=f) for f in families}
                       for g in ("layer", "neuron", "head", "weight")})
counts.loc["total"] = counts.sum()
counts

# %% [markdown]
# Layers are named compactly in plots (`mid.a0.tb0` = the transformer block of the mid block, `text.L1` = text
# layer 1), listed here in the order they run:

# %%
print(model.space.layers())

# %% [markdown]
# `model.components(granularity, **filters)` selects a set (filters: `family`, `kind`, `block`, `layer`, `model`).
# Here: the hidden units of the feed-forward block in the UNet's mid block. An address parses into a `Component`
# that knows where it lives, and prints back as the same address:

# %%
mid_units = model.components("neuron", family="ff", kind="ff.net.0", block="mid_block")
print(mid_units)
c = mid_units[17]
print("address:    ", c)
print("module:     ", c.module)
print("unit:       ", c.index, f"(of {len(mid_units)})")
print("family/kind:", c.family, "/", c.kind)
print("block/layer:", c.block, "/", c.layer, "| granularity:", c.granularity)
print("round trip: ", model.space.parse(str(c)) == c)

# %% [markdown]
# A mistyped address fails loudly, with the nearest valid ones:

# %%
try:
    model.space.parse("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.1[17]")
except interp.UnknownComponentError as err:
    print(err)

# %% [markdown]
# ## One method, one concept: CAD on "red"
#
# A concept in the concept world is an attribute value. Its **target prompts** are captions of scenes with that
# value, its **anchor prompts** the same captions with the word left out:

# %%
cfg = ObjectiveConfig(kind="erase", n_images=2, timesteps=(250, 600)) if SMALL else ObjectiveConfig(kind="erase")
concept = world_concept("red", n=cfg.n_images)
for target, anchor in list(zip(concept.target_prompts, concept.anchor_prompts))[:4]:
    print(f"{target!r:55} anchor: {anchor!r}")

# %% [markdown]
# The **erase objective** J measures how differently the model denoises with and without the concept in the
# prompt, averaged over a fixed evaluation set (renders of red scenes, noised at a few timesteps):
# `J = mean ||eps(z_t, target) - eps(z_t, anchor)||^2`. A component *supports* the concept if ablating it
# lowers J.
#
# **CAD** (Nguyen et al. 2024) estimates that drop to first order: `score = w * dJ/dw`, summed over the weights the
# component owns, from a single backward pass. `interp.attribute` runs any registered method the same way and
# returns one tidy table, one row per component; `score > 0` means the component supports "red".
# Here we score every feed-forward hidden unit of the UNet.

# %%
units = model.components("neuron", family="ff", kind="ff.net.0")
df = interp.attribute("cad", model, "red", units, objective=cfg)
print(len(df), "rows;", f"{df.attrs['meta']['cost']['seconds']:.1f} s")
df.nlargest(8, "score")[["component", "layer", "unit", "score", "stderr"]]

# %% [markdown]
# The columns are the same for every method (`method, concept, component, family, block, layer, depth, kind,
# unit, granularity, score, stderr, ...`); `df.attrs["meta"]` holds the run's configuration, cost and versions.
# The most *negative* scores are units whose removal would make the model draw red more strongly:

# %%
df.nsmallest(5, "score")[["component", "layer", "unit", "score", "stderr"]]

# %% [markdown]
# ## Where does CAD put "red"?
#
# Summing the positive and the negative scores per layer shows where the estimated support and suppression sit,
# layers in the order they run (down path, mid block, up path):

# %%
per_layer = (
    df.assign(supports=df["score"].clip(lower=0), suppresses=-df["score"].clip(upper=0))
    .groupby(["depth", "layer"], as_index=False)[["supports", "suppresses"]].sum()
    .sort_values("depth")
)
x = np.arange(len(per_layer))
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.bar(x - 0.2, per_layer["supports"], 0.4, color="tab:red", label="sum of positive scores (support 'red')")
ax.bar(x + 0.2, per_layer["suppresses"], 0.4, color="tab:blue", label="|sum of negative scores| (suppress it)")
ax.set_xticks(x, per_layer["layer"], rotation=30, ha="right")
ax.set_xlabel("UNet transformer block (execution order)")
ax.set_ylabel("CAD score mass")
ax.set_title("CAD on 'red': feed-forward hidden units, per layer")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The same picture, normalized, comes from `interp.report.plots.localization_heatmap`, which takes any result table
# (several concepts become columns):

# %%
interp.report.plots.localization_heatmap(df, "cad")

# %% [markdown]
# CAD is a first-order estimate from one backward pass. Whether its ranking matches what ablating each unit really
# does, and how it compares with the other methods, is the subject of **notebook 2**. Notebook 3 localizes the
# concept with causal tracing, notebook 4 uses attributions to erase and amplify concepts, and notebook 5 runs all
# of this on your own Stable Diffusion checkpoint.

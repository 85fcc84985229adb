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
# # 3. Causal tracing: where is the concept read in?
#
# Causal tracing (Meng et al. 2022 for language models; Basu et al., ICLR 2024, for text-to-image models) asks a
# different question from ablation. Three runs of the model:
#
# 1. **clean**: the prompt as it is ("a red striped circle on white"), giving J_clean;
# 2. **corrupted**: the token embeddings of the concept's words ("red") get Gaussian noise (3x the embeddings'
#    standard deviation), which wipes the concept out: J drops to J_corrupted;
# 3. **restored**: the corrupted run again, but one component's state is replaced by its value from the clean run.
#
# A component's score is the fraction of the concept that its clean state brings back,
# `(J_restored - J_corrupted) / (J_clean - J_corrupted)`: 1 means that state alone carries everything the
# corruption removed, 0 means it carries nothing of it. Restoring a state at *one layer and one token position* of
# the text encoder, or *one layer at one timestep* of the UNet, gives two maps of where the information about the
# concept flows.
#
# `SMALL` (set by the test suite) uses a tiny evaluation set and one noise draw; without it the maps use 4 images x
# 5 timesteps and 3 noise draws per concept, for two concepts (about two minutes on a laptop CPU).

# %%
# %matplotlib inline
import interp
from interp.notebook import notebook_setup

SMALL = notebook_setup()  # quiet library chatter; the tests set a small configuration

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

import interp.report.plots
from interp.core.objectives import ObjectiveConfig
from interp.world.concepts import world_concept

model = interp.load_model("concept-world")
print("small configuration" if SMALL else "full configuration")

# %% [markdown]
# ## Run it
#
# The components are whole layers: the three text-encoder layers, the UNet's transformer blocks and its ResNet
# blocks, listed in the order they run.
#
# **Which J?** Tracing needs an objective that measures how much of the concept the prompt conveys, so that
# corrupting the concept's words lowers it. CAD's *amplify* objective does: it is the (negative) denoising loss on
# noised renders of the concept, high when the prompt tells the model what it is looking at. (The *erase* objective
# of notebooks 1-2 is not suited: it measures how far the prediction moves away from the prompt *without* the
# concept, and a prompt with noise in place of the word is also far from that.) The UNet map is read per timestep
# of the evaluation set. With `ObjectiveConfig(kind="classifier")` tracing runs end to end instead (the classifier's
# probability of the concept on generated images, states restored at every denoising step), as Basu et al. do with
# CLIP scores; it is closer to the paper and far more expensive.

# %%
CONCEPTS = ["red"] if SMALL else ["red", "circle"]
cfg = (ObjectiveConfig(kind="amplify", n_images=2, timesteps=(500, 800)) if SMALL
       else ObjectiveConfig(kind="amplify", n_images=4, timesteps=(300, 500, 700, 900)))
layers = model.components("layer", kind=("encoder_layer", "transformer_block", "resnet"))
print(len(layers), "layers:", [c.layer for c in layers])

tracing = interp.methods.get("tracing")(n_noise=1 if SMALL else 3)
frames, maps = {}, {}
for concept in CONCEPTS:
    run = tracing.run(model, concept, layers, objective=cfg)  # one run: its scores and its maps
    frames[concept], maps[concept] = run.scores, run.maps  # one score per layer; layer x timestep and token maps
    meta = frames[concept].attrs["meta"]
    print(f"{concept!r}: J clean {meta['j_clean']:.5f}, J corrupted {np.mean(meta['j_corrupted']):.5f} "
          f"({meta['cost']['seconds']:.0f} s)")
results = pd.concat(frames.values(), ignore_index=True)
maps = pd.concat(maps.values(), ignore_index=True)  # axis "timestep" or "token", and the position on it

# %% [markdown]
# Which tokens were corrupted: the concept word in each target prompt (the "last subject token" is its last token;
# every concept-world concept is a single word, hence a single token).

# %%
for concept in CONCEPTS:
    c = world_concept(concept, n=cfg.n_images)
    positions = frames[concept].attrs["meta"]["subject_positions"]
    for prompt, pos in list(zip(c.target_prompts, positions))[:2]:
        tokens = model.tokenizer.convert_ids_to_tokens(model.tokenizer(prompt).input_ids)
        print(" ".join(f"[{t}]" if i in pos else t for i, t in enumerate(tokens)))

# %% [markdown]
# ## One score per layer
#
# The result has one row per component: the fraction restored when that layer's output is clean at every
# timestep and every token position. A layer's output contains everything computed before it, so these scores are
# not shares of a whole, and three kinds of layers are fixed by the architecture: every whole text-encoder layer
# restores everything (all of the prompt's information passes through each), the UNet layers that run before the
# first cross-attention restore nothing (the text has not reached them yet), and the ResNet blocks after the last
# cross-attention restore everything. The informative part is in between.

# %%
main = results
fig, ax = plt.subplots(figsize=(9, 3.4))
width = 0.8 / len(CONCEPTS)
for i, (name, g) in enumerate(main.groupby("concept", sort=False)):  # rows keep the layers' execution order
    x = np.arange(len(g))
    ax.bar(x + i * width, g["score"], width, yerr=g["stderr"], label=name)
ax.set_xticks(x + width * (len(CONCEPTS) - 1) / 2, g["layer"], rotation=60, ha="right")
ax.axhline(1, color="0.6", lw=0.8, ls="--")
ax.set_ylabel("restored fraction")
ax.set_title("restoring one layer's clean output (all timesteps, all positions)")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The text encoder: layer x token
#
# Each cell restores one text-encoder layer's clean output **at one token position** only. Positions are counted
# relative to the last subject token: **0 is the concept's (last) token**, -1 the token before it, +1 the one after,
# and so on (prompts differ in length and in where the concept sits, so absolute positions would not line up; the
# x axis of the maps shows these relative positions). The text encoder is causal: a token only sees the tokens
# before it, so positions before the concept were never corrupted and restore nothing.

# %%
for concept in CONCEPTS:
    display(interp.report.plots.trace_map_text(maps, concept))

# %% [markdown]
# ## The UNet: layer x timestep
#
# Each cell restores one UNet layer's clean output for the samples of one timestep (the text stays corrupted).
# Timesteps run in denoising order, from noisy (left) to almost clean (right). A ResNet block has three rows: its
# two convolutions and its output. Fractions are relative to a small difference of J, so single cells can exceed 1
# or go below 0; look for the consistent bands.

# %%
for concept in CONCEPTS:
    display(interp.report.plots.trace_map_unet(maps, concept))

# %% [markdown]
# ## Where does the concept live?
#
# The strongest single states in the two maps, and the cross-attention transformer blocks in which restoring the
# clean output brings back the most of the concept:

# %%
blocks = main[main["kind"] == "transformer_block"]
for name in CONCEPTS:
    text = maps[(maps["concept"] == name) & (maps["axis"] == "token")]
    best_t = text.loc[text["score"].idxmax()]
    at_subject = text[text["position"] == 0].set_index("layer")["score"]
    top_blocks = blocks[blocks["concept"] == name].nlargest(3, "score")
    print(f"'{name}'")
    print(f"  text encoder: strongest single state {best_t['layer']} at token offset {int(best_t['position']):+d} "
          f"(restores {best_t['score']:.2f}); the concept's own token (offset 0) restores "
          + ", ".join(f"{s:.2f} at {layer}" for layer, s in at_subject.items()))
    print("  UNet transformer blocks: " + ", ".join(f"{r.layer} {r.score:.2f}" for r in top_blocks.itertuples()))

# %% [markdown]
# How to read this:
#
# - **A single causal state, or a distributed one.** If one cell at offset 0 restores most of the concept, the
#   concept's information sits in that token's state, and the later layers and tokens read it from there. This is
#   what Basu et al. found for Stable Diffusion's CLIP text encoder: essentially **one causal state, layer 0 at the
#   last subject token**, which is why their Diff-QuickFix edit (notebook 4) rewrites only that layer's attention
#   output. If no single cell restores much, the later tokens have already read the corrupted word in the first
#   layer and carry the concept *together*: restoring one of them is not enough.
# - **Offsets after the concept** restore when the information has been copied forward: later tokens (the next
#   attribute word, "on", the end-of-text token) attend to the concept's token, and the UNet's cross-attention reads
#   the final state of every position, not only the concept's. Several cells near 1 mean redundancy: each of those
#   states alone is enough for the UNet to draw the concept.
# - **UNet depth.** The rows where restoration becomes large mark where the concept's text information is read into
#   the image. Different concepts need not enter at the same depth or resolution (here `down1` and `up1` work at
#   8x8 pixels, `down2`, `mid` and `up0` at 4x4): compare the two concepts' maps. The timestep columns say at which
#   noise level that reading still matters.
# - Tracing finds where the concept's information *can be recovered from*, not what each component contributes in
#   the clean run; for that, compare with true ablation (notebook 2), whose per-layer answer can differ.

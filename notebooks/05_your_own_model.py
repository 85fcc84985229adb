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
# # 5. Your own model
#
# Everything in notebooks 1-4 runs on any Stable Diffusion 1.x/2.x pipeline, not only on the shipped concept
# world. `interp.load_model` takes a folder written by `save_pretrained`, a hub id (downloaded on first use when
# the machine is online, read from the local Hugging Face cache otherwise) or a pipeline object, and finds the
# components of the UNet and the CLIP text encoder from a per-architecture table, so nothing below is specific to
# the model we use.
#
# This notebook has to run offline and in seconds, so instead of downloading Stable Diffusion it builds a **tiny
# Stable Diffusion pipeline with random weights from the real classes** (`UNet2DConditionModel`, `CLIPTextModel`,
# `CLIPTokenizer`, `AutoencoderKL`, `PNDMScheduler`, `StableDiffusionPipeline`), laid out as Stable Diffusion 1.5 is
# (the PNDM scheduler it ships, a CLIP tokenizer that pads with its end-of-text token), saves it the way a checkpoint
# is distributed, and loads it back. The images it draws are noise (it was never trained); the point is that every
# call is exactly the one you would make on a real checkpoint. The last cell shows those calls.
#
# `SMALL` (set by the test suite) shrinks the evaluation set and the component set so the notebook runs in seconds.

# %%
import os
import tempfile
from pathlib import Path

# A private, offline Hugging Face cache for this session, so that the hub-id demo below finds the tiny pipeline
# there and nothing is ever downloaded. Delete these three lines to use your own cache (and the network).
WORKDIR = Path(tempfile.mkdtemp(prefix="interp-own-model-"))
os.environ["HF_HUB_CACHE"] = str(WORKDIR / "hub-cache")
os.environ["HF_HUB_OFFLINE"] = "1"

# %matplotlib inline
import json
import shutil

import interp
from interp.notebook import notebook_setup

SMALL = notebook_setup()  # quiet library chatter; the tests set a small configuration

import matplotlib.pyplot as plt
import pandas as pd
import torch

import interp.report.evaluation
import interp.report.plots
from interp.core.objectives import ObjectiveConfig

print("small configuration" if SMALL else "full configuration", "- working folder:", WORKDIR)

# %% [markdown]
# ## A tiny Stable Diffusion pipeline of the real classes
#
# First a tokenizer. CLIP's tokenizer is byte-pair encoding over a `vocab.json` and a `merges.txt`; we write a
# tiny pair of files: every letter (alone and word-final, `</w>`), plus merge rules that assemble a handful of whole
# words, so that "van gogh style" becomes three tokens just as it would with the real CLIP vocabulary.

# %%
from transformers import CLIPTokenizer

# `interp.testing.write_clip_vocab` writes such a pair: every letter alone and word-final, plus the merge rules that
# assemble each word of a list, left to right (c+a -> ca, ca+t</w> -> cat</w>).
from interp.testing import write_clip_vocab

WORDS = ["a", "photo", "image", "picture", "painting", "of", "van", "gogh", "style", "cat", "dog", "in", "the"]

tok_dir = WORKDIR / "tokenizer-files"
tok_dir.mkdir()
write_clip_vocab(tok_dir, WORDS)
tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
ids = tokenizer("a painting of van gogh style").input_ids
print(ids)
print(tokenizer.convert_ids_to_tokens(ids))

# %% [markdown]
# Now the models: a UNet with two resolution levels (cross-attention transformer blocks in the down, mid and up
# paths, as in Stable Diffusion), a 2-layer CLIP text encoder, a small VAE (a factor 2 instead of Stable Diffusion's
# 8), the PNDM scheduler with Stable Diffusion 1.5's settings, and the pipeline without a safety checker. Any other
# diffusers scheduler (DDIM, Euler, DPM-Solver++, UniPC, Heun, ...) can be swapped in; the suite passes each one only
# the options its `step` takes.

# %%
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

torch.manual_seed(0)
unet = UNet2DConditionModel(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
)
text_encoder = CLIPTextModel(CLIPTextConfig(
    vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
))
vae = AutoencoderKL(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
    norm_num_groups=4, sample_size=16,
)
scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                          steps_offset=1)  # as in Stable Diffusion 1.5's scheduler_config.json
pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               scheduler=scheduler, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False)

folder = WORKDIR / "tiny-stable-diffusion"
pipe.save_pretrained(folder)
print(sorted(p.name for p in folder.iterdir()))
print(json.loads((folder / "model_index.json").read_text())["_class_name"])

# %% [markdown]
# That folder has the layout of every diffusers checkpoint (`model_index.json` plus one subfolder per part), the
# same as a downloaded `stable-diffusion-v1-5`. Loading it is one call:

# %%
model = interp.load_model(folder)
print(type(model.pipeline).__name__, "| scheduler:", type(model.scheduler).__name__, "| VAE:", type(model.vae).__name__)
print("pad token:", tokenizer.pad_token, "= end-of-text:", tokenizer.pad_token_id == tokenizer.eos_token_id)

# %% [markdown]
# A hub id goes through the same call: `load_model("org/name")` uses the weights in the local Hugging Face cache
# (with the network, it would download them first). To show it offline we place our folder in this session's
# private cache, the way `huggingface-cli download` lays a snapshot out, under the made-up id `tiny/random-sd`.
# An id that is not cached fails with a message saying what to do.

# %%
repo = Path(os.environ["HF_HUB_CACHE"]) / "models--tiny--random-sd"
commit = "0" * 40
shutil.copytree(folder, repo / "snapshots" / commit)
(repo / "refs").mkdir()
(repo / "refs" / "main").write_text(commit)

from_hub = interp.load_model("tiny/random-sd")
print(from_hub.name, type(from_hub.pipeline).__name__)
same = all(torch.equal(a, b) for (_, a), (_, b) in zip(model.parameters(), from_hub.parameters()))
print("same weights as the folder:", same)

try:
    interp.load_model("nobody/not-cached")
except interp.ModelLoadError as err:
    print("ModelLoadError:", err)

# %% [markdown]
# ## Its components
#
# The component grammar is the same as on the concept world: module paths of the real diffusers/transformers
# modules, with `[i]` for a unit. Counts per family (rows) and granularity (columns):

# %%
families = model.space.families()
counts = pd.DataFrame({g: {f: model.space.count(g, family=f) for f in families}
                       for g in ("layer", "neuron", "head", "weight")})
counts

# %%
print(model.space.layers())
c = model.components("head", family="attn2")[1]
print(c, "->", c.family, c.block, c.layer, c.kind, c.granularity, "head", c.index)
print(model.space.parse(str(c)) == c)

# %% [markdown]
# ## A concept is a phrase
#
# On a general model a concept is a phrase; `interp.text_concept` puts it into a few prompt templates and uses the
# empty prompt as the anchor, as CAD does. The objective's evaluation set is built from images the model generates
# for those prompts (the concept world uses renders instead). The objective's `n_images` images cycle through the
# concept's prompts, each from its own noise.

# %%
cfg = ObjectiveConfig(kind="erase", n_images=2 if SMALL else 4, timesteps=(300, 700) if SMALL else (200, 400, 600, 800),
                      gen_steps=4 if SMALL else 10)
concept = interp.text_concept("van gogh style", n=cfg.n_images)
print(concept.target_prompts)
print(concept.anchor_prompts)

images = interp.generate(model, list(concept.target_prompts[:2]), steps=cfg.gen_steps)  # decoded by the VAE
print(images.shape, "(noise: the weights are random)")
fig, axes = plt.subplots(1, len(images), figsize=(2 * len(images), 2))
for ax, im, p in zip(axes, images, concept.target_prompts):
    ax.imshow(im.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(p, fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## CAD and true ablation on it
#
# The UNet's GEGLU feed-forward units and the text encoder's MLP units: CAD's first-order estimate and the measured
# effect of ablating each unit alone. On this untrained model the effects are tiny, and first order is accurate:
# the two agree closely. (On the concept world, notebook 2 shows where they do not.)

# %%
unet_units = model.components("neuron", family="ff", kind="ff.net.0")
text_units = model.components("neuron", family="text_mlp", kind="mlp.fc1")
if SMALL:
    unet_units, text_units = unet_units[:24], text_units[:16]
comps = interp.ComponentSet([*text_units, *unet_units])
print(len(comps), "components, e.g.", comps[0], "and", comps[-1])

frames = [interp.attribute(method, model, concept, comps, objective=cfg) for method in ("cad", "ablation")]
results = pd.concat(frames, ignore_index=True)
results.groupby("method")["score"].describe()

# %%
interp.report.plots.scatter_vs_reference(results, "van gogh style")

# %%
interp.report.evaluation.correlations(results, n_boot=200)

# %% [markdown]
# ## Causal tracing in the text encoder
#
# Basu et al. corrupt the subject's tokens and restore one clean text-encoder state at one token position: the map
# below (text layers x position relative to the last subject token, 0) covers the tokens before the subject, the
# subject, and the end-of-text and padding positions after it, where whatever the subject passes on is carried.
# (This tokenizer pads with the end-of-text token, as SD 1.x's does, so those positions are found from the
# attention mask, not from the pad token.) On random weights the map shows nothing in particular; the layout is
# the point.

# %%
text_layers = model.components("layer", family="text_layer")
tracer = interp.methods.get("tracing")(n_noise=1 if SMALL else 3)
run = tracer.run(model, concept, text_layers, objective=cfg)  # one run: its scores and its maps
tracing, maps = run.scores, run.maps
print("end-of-text at offsets", tracing.attrs["meta"]["end_of_text_offsets"], "after the last subject token")
print("positions in the map:", sorted(maps.loc[maps["axis"] == "token", "position"].unique()))
interp.report.plots.trace_map_text(maps, "van gogh style")

# %% [markdown]
# The loaded models live in memory, so the temporary folder (the saved pipeline and the private hub cache) can go:

# %%
shutil.rmtree(WORKDIR, ignore_errors=True)

# %% [markdown]
# Nothing above touched the weights (every intervention acts through multipliers on module outputs), so the
# pipeline object is still usable as it was: `model.pipeline(...)` is the ordinary diffusers pipeline.
#
# ## With real weights
#
# On a machine with a GPU and a Stable Diffusion checkpoint (a folder, or a hub id: downloaded on first use when
# online), the same analysis is:
#
# ```python
# import pandas as pd
# import interp
# import interp.report.plots
# from interp.core.objectives import ObjectiveConfig
#
# model = interp.load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype="float16")
# cfg = ObjectiveConfig(kind="erase", n_images=4, timesteps=(250, 600), gen_steps=25)
# concept = interp.text_concept("Van Gogh style", n=cfg.n_images)
# comps = model.components("neuron", family="ff", kind="ff.net.0", block="mid_block")
# cad = interp.attribute("cad", model, concept, comps, objective=cfg, store="cache/")        # one backward pass
# truth = interp.attribute("ablation", model, concept, comps, objective=cfg, store="cache/")  # one pass per unit
# interp.report.plots.scatter_vs_reference(pd.concat([cad, truth]), "Van Gogh style")
# ```
#
# `dtype` sets the precision of the forward passes; objective values, gradients and statistics are accumulated in
# float32 whatever it is. True ablation needs float16 or float32: a single unit's effect is the difference of two
# nearly equal values of J, which bfloat16 rounds away (Spearman 0.68-0.86 with the float64 truth, against 0.99 in
# float16; the documentation's "Scale" page has the measurement). bfloat16 is fine for CAD and the other gradient
# estimators. `store=`
# caches results on disk under a hash of their configuration, so an interrupted ablation resumes. `erase` and
# `amplify` work anywhere; the end-to-end `classifier` objective asks an image judge, which on Stable Diffusion is
# CLIP zero-shot: `ObjectiveConfig(kind="classifier", judge="openai/clip-vit-large-patch14")` (a hub id or a
# folder) with `interp.text_concept("Van Gogh style", alternatives=("Monet style", "a photograph"))`.

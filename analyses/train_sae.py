"""Train a top-k sparse autoencoder on one module's activations over generation trajectories.

    python -m analyses.train_sae --site unet.mid_block.attentions.0.transformer_blocks.0.ff --k 8 --expansion 4 \\
        --out runs/sae-mid-ff

Collects the module's output over --prompts x --seeds generations (every denoising step, both guidance branches
where the model is guided; on the concept world the default prompts are every concept word's target and anchor
prompts), trains an SAE on those rows with EleutherAI's sparsify (interp.core.features.train_sae: Adam, decoder bias at
the data mean, unit-norm decoder rows, AuxK on dead latents) and writes to --out: sae.safetensors and cfg.json
(sparsify's layout), features.json (site, training config, data hash, quality) and quality.json. Seeded; a killed
run resumes from --out (its activations and training checkpoint) to the same SAE. Attribute its features with
`python -m analyses.compare_methods --granularity feature --sae <out>`. Expected failures print one line and exit
with code 2. Needs the `sae` extra (pip install -e '.[sae]').
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from safetensors.torch import load_file, save_file

from analyses._cli import apply_threads, config_parser, parse_config, quiet_if_asked, run_or_exit
from interp.core import features
from interp.core.concepts import resolve
from interp.core.models import load_model
from interp.core.store import atomic_write_text, config_hash
from interp.studies.compare_config import DEVICES, PRECISIONS, check_fields, opt


@dataclass(frozen=True)
class TrainSAEConfig:
    """Everything an SAE depends on: the activations it is trained on and its training. The command line is
    generated from it; validated on construction, before anything loads."""

    model: str = opt("concept-world", "'concept-world' (shipped), a pipeline folder written by save_pretrained, or a "
                                      "hub id")
    site: str = opt("unet.mid_block.attentions.0.transformer_blocks.0.ff",
                    "module path whose output the SAE encodes (a feed-forward, an attention, a transformer block, or "
                    "a UNet attention stage such as unet.up_blocks.1.attentions.1, whose spatial positions are rows)")
    prompts: tuple[str, ...] = opt((), "prompts of the generations (empty: on the concept world every concept word's "
                                       "target and anchor prompts; other models need them)", nargs="*",
                                   metavar="PROMPT")
    seeds: tuple[int, ...] = opt((0, 1, 2, 3), "seeds of the generations' initial noise: every prompt from each")
    gen_steps: int = opt(10, "denoising steps per generation (every step's activations are rows)")
    guidance: float | None = opt(None, "classifier-free guidance scale (default: the model's)")
    positions: int | None = opt(None, "rows kept per denoiser call, drawn at random (default: all)")
    k: int = opt(8, "latents active per row (top-k)")
    expansion: int = opt(4, "features per input dimension (n_features = expansion x d)")
    steps: int = opt(2000, "training steps (Adam)")
    batch: int = opt(1024, "rows per training step")
    lr: float | None = opt(None, "learning rate (default: sparsify's, 2e-4 / sqrt(n_features / 2^14))")
    auxk_alpha: float = opt(1 / 32, "weight of the AuxK loss on dead latents (0: off)")
    seed: int = opt(0, "seed of the SAE's initialization, batches and subsampled rows (>= 0)")
    device: str = opt("auto", "device: auto (CUDA, else MPS, else CPU), cpu, cuda or mps", choices=DEVICES)
    dtype: str = opt("float32", "precision of the model's forward passes (the SAE trains in float32)",
                     choices=PRECISIONS, flags=("--precision",))

    def __post_init__(self):
        check_fields(self)
        if not self.model.strip():
            raise ValueError("model is empty: pass 'concept-world', a pipeline folder or a hub id")
        if not self.site.strip() or "#" in self.site or " " in self.site:
            raise ValueError(f"--site {self.site!r} is not a module path: pass one such as "
                             f"unet.mid_block.attentions.0.transformer_blocks.0.ff")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("--prompts has an empty prompt: pass non-empty prompts")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"--seeds must be distinct integers >= 0, got {list(self.seeds)}")
        for name in ("gen_steps", "k", "expansion", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.positions is not None and self.positions < 1:
            raise ValueError(f"--positions must be >= 1 (or left out: every row), got {self.positions}")
        if self.k > self.expansion * 4096 or self.k < 1:
            raise ValueError(f"--k {self.k} is out of range")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ValueError(f"--lr must be in (0, 1), got {self.lr}")
        if self.auxk_alpha < 0:
            raise ValueError(f"--auxk-alpha must be >= 0, got {self.auxk_alpha}")

    def to_dict(self) -> dict:
        """The fields as a dict (recorded in features.json and keying the resumable state)."""
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """TrainSAEConfig's fields, plus --out, --threads and --no-progress."""

    return config_parser("train_sae", __doc__, TrainSAEConfig,
                         "folder of the SAE (created; a run killed there resumes)", out_required=True)


def default_prompts(model, seed: int) -> list[str]:
    """Every concept word's target and anchor prompts (concept world), de-duplicated in order."""

    words = [w for values in model.world.attributes.values() for w in values]
    prompts = []
    for w in words:
        c = resolve(model, w, n=2, seed=seed)
        prompts += [*c.target_prompts, *c.anchor_prompts]
    return list(dict.fromkeys(prompts))


def run(cfg: TrainSAEConfig, out: Path, progress: bool = True, log=lambda msg: None) -> dict:
    """Collect (or read back) the activations, train (or resume) the SAE, write it: returns its quality."""

    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    prompts = list(cfg.prompts)
    if not prompts:
        if model.world is None:
            raise ValueError(f"{cfg.model} has no concepts of its own: pass --prompts")
        prompts = default_prompts(model, cfg.seed)
    features.site_layout(model, cfg.site)  # an unknown site fails here, before any generation
    out.mkdir(parents=True, exist_ok=True)
    collect = {k: v for k, v in cfg.to_dict().items()
               if k in ("model", "site", "seeds", "gen_steps", "guidance", "positions", "seed", "dtype")}
    collect["prompts"] = prompts
    key = config_hash(collect)
    cached = out / "activations.safetensors"
    acts = None
    if cached.exists():
        stored = load_file(str(cached))
        if (out / "activations.json").exists() and json.loads((out / "activations.json").read_text()).get("key") == key:
            acts = stored["acts"]
            log(f"activations read back from {cached} ({tuple(acts.shape)})")
    if acts is None:
        acts = features.collect_activations(model, cfg.site, prompts, seeds=cfg.seeds, steps=cfg.gen_steps,
                                            guidance=cfg.guidance, positions=cfg.positions, seed=cfg.seed,
                                            progress=progress)
        save_file({"acts": acts.contiguous()}, str(cached))
        atomic_write_text(out / "activations.json", json.dumps({"key": key, "collect": collect}, indent=1))
        log(f"{tuple(acts.shape)} activation rows of {cfg.site} from {len(prompts)} prompts x {len(cfg.seeds)} seeds x "
            f"{cfg.gen_steps} steps")
    if cfg.k > cfg.expansion * acts.shape[1]:
        raise ValueError(f"--k {cfg.k} is more than the {cfg.expansion * acts.shape[1]} features (--expansion "
                         f"{cfg.expansion} x width {acts.shape[1]}): lower --k or raise --expansion")
    sae = features.train_sae(acts, k=cfg.k, expansion=cfg.expansion, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed,
                             batch=cfg.batch, site=cfg.site, auxk_alpha=cfg.auxk_alpha,
                             checkpoint=out / "checkpoint.pt", progress=progress)

    sae = features.attach(model, replace(sae, config={**sae.config, "command": cfg.to_dict()}))  # its layout
    features.save_sae(sae, out)
    atomic_write_text(out / "quality.json", json.dumps(sae.quality, indent=1))
    return sae.quality


def main(argv=None) -> int:
    parser = build_parser()
    args, cfg = parse_config(parser, TrainSAEConfig, argv)

    if importlib.util.find_spec("sparsify") is None:  # the trainer's library: a clear line when the extra is missing
        parser.exit(2, "error: training an SAE needs eai-sparsify: pip install -e '.[sae]'\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    apply_threads(parser, args.threads)
    with quiet_if_asked(args):
        q = run_or_exit(parser, None, lambda: run(cfg, args.out, progress=not args.no_progress, log=logging.info))
    logging.info("SAE at %s: fvu %.4f, L0 %.2f, dead %d, dense %d of %d features; written to %s", cfg.site, q["fvu"],
                 q["l0"], q["dead"], q["dense"], q["n_features"], args.out.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""COAR: component attribution by random-mask regression (Shah, Ilyas, Madry, "Decomposing and Editing Predictions
by Modeling Model Computation", ICML 2024).

Draw M random masks in which every component is ablated independently with probability ``alpha``; measure J under
each mask (batched through the engine, many masks per forward pass); fit a linear model with intercept from the
mask (1 = ablated) to J. Its coefficients are the attributions: ``score = -coefficient`` (a component whose ablation
lowers J supports the concept). COAR fits one model per example; the least-squares coefficients are linear in the
targets, so fitting every evaluation sample at once (one multi-output solve) and averaging gives the fit of mean J,
and the spread over samples gives the standard error. The fit is ``torch.linalg.lstsq`` (unregularized, as COAR;
the minimum-norm solution when masks are fewer than components) or scikit-learn's ``Ridge`` with ``ridge > 0``.

Quality is the linear datamodeling score (LDS) on held-out masks: the correlation between predicted and measured J
(Spearman, the datamodels convention, and Pearson, as COAR's code) over ``heldout`` of the masks, written to the
result's metadata. Differences from COAR: COAR's outputs are per-example margins of a classifier and its solver is
SAGA on 50k+ masks; here the output is a diffusion objective and M is in the thousands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy import stats

from interp.core.engine import masked_values, random_masks
from interp.core.results import Cost
from interp.methods.base import Capabilities, Estimate, Method, MethodConfig, Scores, option, register, stderr_over


@dataclass(frozen=True)
class COARConfig(MethodConfig):
    """COAR's options.

    Attributes:
        n_masks: random masks M; 0 (the default, as ``compare_methods --coar-masks``) means twice the number of
            components, the budget COAR needs (fewer masks fit far worse); otherwise at least 10.
        alpha: the masks' ablation rate, in (0, 1).
        heldout: share of the masks kept out of the fit to measure its LDS, in (0, 1).
        ridge: ridge penalty of the fit (0: unregularized least squares, as COAR).
        mode: ``"zero"`` or ``"mean"`` ablation.
        chunk: masks per cached chunk.
        curve: also fit on the first m training masks, for each m (rows of variant ``coar@m``).
    """

    #: ``n_masks`` may be 0 (twice the components), so it is checked here rather than as a count.
    COUNTS: ClassVar[tuple[str, ...]] = ("chunk",)

    n_masks: int = option(0, "COAR's random masks (0: twice the number of components; otherwise at least 10)",
                          flag="masks")
    alpha: float = option(0.05, "COAR's ablation rate, in (0, 1)")
    heldout: float = 0.2
    ridge: float = 0.0
    mode: str = "zero"
    chunk: int = 256  # masks per cached chunk
    curve: tuple[int, ...] = ()  # also fit on the first m training masks; rows appear as variant "coar@m"

    def __post_init__(self):
        super().__post_init__()
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.heldout < 1:
            raise ValueError(f"heldout must be in (0, 1), got {self.heldout}")
        if isinstance(self.n_masks, bool) or not isinstance(self.n_masks, (int, np.integer)) or (
                self.n_masks != 0 and self.n_masks < 10):
            raise ValueError(f"COAR needs at least 10 masks (or 0: twice the components), got {self.n_masks!r}")

    def masks_for(self, n_components: int) -> int:
        """The number of masks for ``n_components`` components: ``n_masks``, or twice the components when 0."""
        return self.n_masks or 2 * n_components


def fit_linear(Z: np.ndarray, Y: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Least squares with intercept, one column of ``Y`` per target: returns (intercepts (T,), coefs (n, T))."""
    if ridge > 0:
        from sklearn.linear_model import Ridge

        m = Ridge(alpha=ridge, fit_intercept=True).fit(Z, Y)
        return np.atleast_1d(m.intercept_), np.atleast_2d(m.coef_).T
    X = torch.from_numpy(np.concatenate([np.ones((len(Z), 1)), Z], axis=1))
    sol = torch.linalg.lstsq(X, torch.from_numpy(Y), driver="gelsd").solution.numpy()
    return sol[0], sol[1:]


def lds(pred: np.ndarray, true: np.ndarray) -> dict:
    """Linear datamodeling score: Spearman (datamodels) and Pearson (COAR's code) of predicted vs measured J."""
    if np.std(pred) == 0 or np.std(true) == 0:
        return {"spearman": float("nan"), "pearson": float("nan")}
    return {"spearman": float(stats.spearmanr(pred, true).statistic), "pearson": float(stats.pearsonr(pred, true).statistic)}


@register
class COAR(Method):
    """COAR: a linear model from random ablation masks to J, its coefficients negated (see the module
    docstring). One evaluation of J per mask; its held-out LDS is in the result's metadata.
    """
    name = "coar"
    default_erasure = True
    label = "COAR"
    default_run = True
    variants_help = "'coar@m' is COAR fitted on its first m masks."
    Config = COARConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head", "feature", "tokenkv", "tokenspan"), baseline=True)

    def _scores(self, obj, comps, run):
        cfg = self.config
        n_masks = cfg.masks_for(len(comps))
        masks = random_masks(n_masks, len(comps), cfg.alpha, cfg.seed)
        J = masked_values(obj, comps, masks, cfg.mode, run.entry, cfg.chunk, run.progress, tag="coar",
                          executor=run.executor).double().numpy()
        n_test = max(1, int(round(cfg.heldout * n_masks)))
        Z = masks.numpy().astype(np.float64)
        Ztr, Zte, Jtr, Jte = Z[:-n_test], Z[-n_test:], J[:-n_test], J[-n_test:]
        b0, coef = fit_linear(Ztr, Jtr, cfg.ridge)  # coef (n, S)
        score = -coef.mean(1)
        pred = b0.mean() + Zte @ coef.mean(1)
        held = lds(pred, Jte.mean(1))
        per_sample = [lds(b0[s] + Zte @ coef[:, s], Jte[:, s]) for s in range(J.shape[1])]
        extra, curve = [], {}
        for m in sorted(set(cfg.curve)):
            if not 10 <= m < len(Ztr):
                raise ValueError(f"curve point {m} must be at least 10 and below the {len(Ztr)} training masks")
            b0m, cm = fit_linear(Ztr[:m], Jtr[:m], cfg.ridge)
            extra.append(Estimate(-cm.mean(1), stderr_over(torch.from_numpy(-cm), 1).numpy(),
                                  {"variant": f"coar@{m}", "estimator": "coar", "budget": m, "mask_alpha": cfg.alpha}))
            curve[f"coar@{m}"] = {"n_masks": m, **lds(b0m.mean() + Zte @ cm.mean(1), Jte.mean(1))}
        return Scores(
            score, stderr_over(torch.from_numpy(-coef), 1).numpy(), {"budget": n_masks, "mask_alpha": cfg.alpha},
            variants=extra, variant_costs={v: Cost(float(p["n_masks"])) for v, p in curve.items()},  # first m masks
            meta={"alpha": cfg.alpha, "n_train": len(Ztr), "n_test": n_test,
                  "underdetermined": len(Ztr) <= len(comps), "lds_spearman": held["spearman"],
                  "lds_pearson": held["pearson"],
                  "lds_spearman_per_sample": float(np.nanmean([d["spearman"] for d in per_sample])),
                  "lds_pearson_per_sample": float(np.nanmean([d["pearson"] for d in per_sample])),
                  "j_intact": float(obj.intact.mean()), "curve": curve},
        )

    @classmethod
    def compare_options(cls, cfg, n_components):
        """``--coar-masks`` masks (0: twice the components) at ``--coar-alpha``, and the budget curve at 1/8, 1/4
        and 1/2 of the training masks, where at least 10 masks are left to fit."""
        opts = super().compare_options(cfg, n_components)
        m = opts["n_masks"] = opts.get("n_masks") or 2 * n_components
        heldout = opts.get("heldout", COARConfig.heldout)
        n_train = m - max(1, int(round(heldout * m)))
        if "curve" not in cfg.options.get(cls.name, {}):
            opts["curve"] = tuple(sorted({k for f in (0.125, 0.25, 0.5)
                                          if 10 <= (k := max(10, int(m * (1 - heldout) * f))) < n_train}))
        return opts

    @classmethod
    def memory_bytes(cls, config, n_components):
        """The masks (a float32 draw, a bool mask) and the float64 design matrix with its train and test copies and
        the least-squares matrix: about 29 bytes per mask and component."""
        masks = next(f for f in cls.command_options() if f.name == "n_masks")
        return {f"COAR masks ({cls.flag(masks)} x components)":
                config.masks_for(n_components) * n_components * 29}

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows of a run (see :mod:`interp.studies.plan`): one evaluation of J per random mask."""
        return shape.means(comps, config.mode) + shape.values(config.masks_for(len(comps)))

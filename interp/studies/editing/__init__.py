"""Concept editing from attributions: CAD-Erase/Amplify (Nguyen et al. 2024), Diff-QuickFix (Basu et al., ICLR 2024),
COAR-Edit (Shah et al., ICML 2024), Unified Concept Editing (Gandikota et al., WACV 2024) and ablation of any
method's top components, with a held-out evaluation.

    from interp.studies.editing import cad_erase, diff_quickfix, evaluate_edit
    edit = cad_erase(model, "red")                    # a frozen record of what to change
    with edit.apply(model) as edited:                 # the user's model is bitwise the same afterwards
        images = edited.generate(["a photo of a red circle"])
    result = evaluate_edit(model, edit)               # target and retained rates on held-out prompts and seeds

See :mod:`interp.studies.editing.edits`, :mod:`interp.studies.editing.uce` and :mod:`interp.studies.editing.evaluate`.
"""

from interp.studies.editing.edits import (
    CAD_DEFAULT_RATIO,
    COMPONENT_PRESETS,
    EDIT_SEED,
    QUICKFIX_LAMBDA,
    AblationEdit,
    Edit,
    EditedModel,
    QuickFixSolution,
    Ranking,
    WeightEdit,
    WeightScores,
    WeightUpdate,
    cad_amplify,
    cad_amplify_neurons,
    cad_erase,
    cad_erase_neurons,
    cad_weight_scores,
    coar_edit,
    coar_edit_ranking,
    default_edit_components,
    diff_quickfix,
    diff_quickfix_solution,
    edit_components,
    per_row_count,
    quickfix_solve,
    rank_components,
    select_per_row,
    welch_t,
)
from interp.studies.editing.evaluate import (
    DRAWN,
    EVAL_SEED,
    PER_VALUE_COLUMNS,
    SUMMARY_COLUMNS,
    Baseline,
    EditEvaluation,
    EvalConfig,
    baseline,
    evaluate_edit,
    frechet_distance,
    heldout_set,
    image_grid,
    images_per_call,
    judge,
    judge_images,
    resolve_judge,
    sweep_table,
    tradeoff_plot,
)
from interp.studies.editing.uce import UCESolution, uce, uce_solve

__all__ = [
    "UCESolution", "uce", "uce_solve",
    "CAD_DEFAULT_RATIO", "EDIT_SEED", "EVAL_SEED", "PER_VALUE_COLUMNS", "QUICKFIX_LAMBDA", "SUMMARY_COLUMNS",
    "AblationEdit", "Baseline", "Edit", "EditEvaluation", "EditedModel", "EvalConfig", "QuickFixSolution", "Ranking",
    "WeightEdit", "WeightScores", "WeightUpdate", "baseline", "cad_amplify", "cad_amplify_neurons", "cad_erase",
    "cad_erase_neurons", "cad_weight_scores", "coar_edit", "coar_edit_ranking", "default_edit_components",
    "edit_components", "COMPONENT_PRESETS", "DRAWN",
    "diff_quickfix", "diff_quickfix_solution", "evaluate_edit", "frechet_distance", "heldout_set", "image_grid", "images_per_call",
    "judge", "judge_images", "resolve_judge", "per_row_count", "quickfix_solve", "rank_components", "select_per_row", "sweep_table", "tradeoff_plot",
    "welch_t",
]

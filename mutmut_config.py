"""mutmut 2 hooks (read by ``mutmut run`` from the repository root; see CONTRIBUTING.md, "Mutation testing").

Each mutated math module runs only the fast tests that cover it, stopping at the first failure.
"""

from __future__ import annotations

PYTEST = "python -m pytest -x -q -p no:cacheprovider "
P = "tests/test_properties.py::test_"
TESTS = {
    "generator/losses.py": f"tests/test_generator_losses.py tests/test_generator_mi.py "  # fidelity_loss: _mi
                           f"{P}diffusion_dpo_log2_at_init_and_swap_symmetry "
                           f"{P}sdpo_lambda_in_unit_interval_and_all_ones_weight_is_plain",
    "generator/mi.py": f"tests/test_generator_mi.py {P}weighted_mi_laws",
    "preference/clip/losses.py": f"tests/test_clip_losses.py {P}clip_dpo_log2_at_init_and_swap_symmetry "
                                 f"{P}dhn_nce_permutation_and_scale_invariant "
                                 f"{P}contrastive_permutation_invariant_and_bounded",
    "preference/clip/attention.py": f"tests/test_clip_attention.py {P}attention_entropy_bounds_and_patch_permutation",
    "preference/clip/ot.py": "tests/test_clip_ot.py",
    "segmentation/metrics.py": f"tests/test_seg_metrics.py {P}dice_iou_bounds_symmetry_and_identity "
                               f"{P}nsd_and_hd95_bounds",
    "segmentation/saliency/m2ib.py": "tests/test_seg_saliency.py",
    "core/stats.py": "tests/test_core_stats.py",
    "segmentation/saliency_metrics.py": "tests/test_saliency_metrics.py",
}

def pre_mutation(context) -> None:
    """Narrow the runner to the tests of the mutated file (all listed tests for any other file)."""
    tests = TESTS.get(context.filename.replace("\\", "/"))
    if tests:
        context.config.test_command = PYTEST + tests

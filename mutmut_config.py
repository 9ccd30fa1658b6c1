"""mutmut 2 hooks (read by ``mutmut run`` from the repository root; see CONTRIBUTING.md, "Mutation testing").

Each mutated math module runs only the fast tests that cover it, stopping at the first failure.
"""

from __future__ import annotations

PYTEST = "python -m pytest -x -q -p no:cacheprovider "
TESTS = {
    "generator/losses.py": "tests/test_generator_losses.py tests/test_properties.py",
    "generator/mi.py": "tests/test_generator_losses.py tests/test_properties.py",
    "preference/clip/losses.py": "tests/test_clip_losses.py tests/test_properties.py",
    "preference/clip/attention.py": "tests/test_clip_attention.py tests/test_properties.py",
    "preference/clip/ot.py": "tests/test_clip_attention.py",
    "segmentation/metrics.py": "tests/test_seg_metrics.py tests/test_properties.py",
    "segmentation/saliency/m2ib.py": "tests/test_seg_saliency.py",
}


def pre_mutation(context) -> None:
    """Narrow the runner to the tests of the mutated file (all listed tests for any other file)."""
    tests = TESTS.get(context.filename.replace("\\", "/"))
    if tests:
        context.config.test_command = PYTEST + tests

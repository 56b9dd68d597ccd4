"""``make demo``'s recipe: the request bodies it sends are valid jobs, and the recipe benchmark
(benchmarks/demo_recipe.py) runs exactly the demo's numbers. The demo itself runs for minutes and is
run by hand (``make demo``, ``python scripts/demo.py --quick``)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from benchmarks.demo_recipe import demo_plan, demo_scene
from gid_core.config import Hyperparameters, ModelConfig, SyntheticDatasetConfig


@pytest.fixture(scope="module")
def demo():
    import sys

    demo_plan()  # loads scripts/demo.py as a module
    return sys.modules["gid_demo_script"]


@pytest.mark.parametrize("which", ["SIZES", "QUICK"])
def test_demo_bodies_are_valid_jobs(demo, which, tmp_path):
    sizes = getattr(demo, which)
    SyntheticDatasetConfig(output_dir=tmp_path, num_train=sizes.num_train, num_val=sizes.num_val,
                           image_size=sizes.image_size, num_classes=sizes.num_classes,
                           min_objects=sizes.min_objects, max_objects=sizes.max_objects, **sizes.scene())
    for backbone, fpn in ((sizes.teacher_backbone, sizes.teacher_fpn), (sizes.student_backbone, sizes.student_fpn)):
        ModelConfig(**demo.model(backbone, fpn, sizes))
    for iters in (sizes.teacher_iters, sizes.student_iters):
        hp = Hyperparameters(**demo.hyperparameters(iters, sizes))
        assert hp.schedule == "cosine"
        for name, value in sizes.distill:
            assert getattr(hp.distill, name) == value


def test_quick_is_smaller_and_recipe_matches(demo):
    full, quick = demo.SIZES, demo.QUICK
    assert quick.teacher_iters * 10 <= full.teacher_iters and quick.num_train * 10 <= full.num_train
    plan = demo_plan()
    for f in fields(full):
        if hasattr(plan, f.name) and f.name != "distill":
            assert getattr(plan, f.name) == getattr(full, f.name), f.name
    assert plan.teacher_stages == (full.teacher_iters,) and plan.distill == dict(full.distill)
    assert demo_scene() == full.scene() == quick.scene()  # the recipe benchmark trains on the demo's scene
    assert full.describe_data().startswith("synthetic digits")

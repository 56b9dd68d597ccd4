"""Resuming a checkpoint with the unlabeled images added or removed (issue #12 item 2): the data
stream's position cannot carry over, so the engine refuses it as a setup problem naming the field."""

from __future__ import annotations

import pytest

from gid_core.engine import JobSetupError, run_job

from tests.gid_core.test_unlabeled import data, distill_job  # noqa: F401  (the module's fixture)


def without_unlabeled(job):
    return job.model_copy(update={"data": job.data.model_copy(update={"unlabeled_images": None,
                                                                       "unlabeled_annotations": None})})


@pytest.mark.parametrize("first_has_unlabeled", [False, True], ids=["added", "removed"])
def test_resume_with_changed_unlabeled_images_is_a_setup_error(data, tmp_path, first_has_unlabeled):  # noqa: F811
    mixed = distill_job(data, max_iters=2)
    first, second = (mixed, without_unlabeled(mixed)) if first_has_unlabeled else (without_unlabeled(mixed), mixed)
    assert run_job(first, output_dir=tmp_path)["status"] == "completed"

    with pytest.raises(JobSetupError) as info:
        run_job(second.model_copy(update={"hyperparameters": second.hyperparameters.model_copy(
            update={"max_iters": 3})}), output_dir=tmp_path)
    (problem,) = info.value.problems
    assert problem.loc == ("data", "unlabeled_images") and problem.code == "resume_mismatch"
    assert f"written {'with' if first_has_unlabeled else 'without'} unlabeled images" in problem.message
    # resume=False starts afresh in the same folder
    assert run_job(second, output_dir=tmp_path, resume=False)["status"] == "completed"

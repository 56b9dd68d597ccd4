"""A teacher with other classes: matching the teacher's categories to the dataset's by name.

The student is built for the dataset's classes; the teacher keeps its own (e.g. torchvision's 90
COCO names, placeholders included). Each dataset class is matched to the teacher class of the same
name, or to the one ``TeacherClasses.class_map`` names for it. GID then reads only the matched
columns: GISM's discrepancy score and the response loss compare the teacher's column of each matched
class with the student's column of that class, and nothing else. A dataset class the teacher lacks
is an error unless ``allow_missing_classes``; then its student column takes no part in the score or
the response loss (it is distilled through the feature and relation losses only, which are class-free).

Column layouts (``gid_core.dense``): ``probs`` hold the C classes (label L in column L - 1);
``logits`` hold column 0 (RetinaNet/FCOS: unused, kept so an identity match changes nothing), the
classes in columns 1..C, then any extra columns (FCOS's centerness), which are kept. Faster R-CNN's
dense view is the RPN's class-agnostic objectness, which needs no mapping (``DenseView.per_class``);
its second-stage softmax logits map through ``ClassMatch.restrict_softmax``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ModelConfig, TeacherClasses
from .dense import DenseOutputs
from .errors import Loc, Problem
from .weights import categories_for, is_weights_name

# Names that hold a label slot without being a class: torchvision's COCO "N/A" ids and background.
PLACEHOLDERS = frozenset({"N/A", "__background__"})
LOC: Loc = ("teacher_classes",)


@dataclass(frozen=True)
class ClassMatch:
    """Dataset label ``student_labels[i]`` is the teacher's label ``teacher_labels[i]`` (labels 1..C)."""

    student_labels: tuple[int, ...]
    teacher_labels: tuple[int, ...]
    num_student: int
    num_teacher: int
    missing: tuple[str, ...] = ()  # dataset classes the teacher lacks

    @property
    def identity(self) -> bool:
        every = tuple(range(1, self.num_student + 1))
        return self.num_teacher == self.num_student and self.student_labels == self.teacher_labels == every

    def restrict(self, t: DenseOutputs, s: DenseOutputs) -> tuple[DenseOutputs, DenseOutputs]:
        """Teacher and student dense outputs reduced to the matched classes, in matching order."""
        return self._side(t, self.teacher_labels), self._side(s, self.student_labels)

    @staticmethod
    def _side(out: DenseOutputs, labels: tuple[int, ...]) -> DenseOutputs:
        num_classes = out.probs.shape[-1]
        device = out.probs.device
        prob_cols = torch.tensor([label - 1 for label in labels], device=device)
        extras = range(num_classes + 1, out.logits.shape[-1])
        logit_cols = torch.tensor([0, *labels, *extras], device=device)
        return dataclasses.replace(
            out, probs=out.probs.index_select(-1, prob_cols), logits=out.logits.index_select(-1, logit_cols)
        )

    def restrict_softmax(self, t_logits: Tensor, s_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax class logits (..., 1 + C) with background in column 0 (Faster R-CNN's box head),
        reduced to background + the matched classes. The teacher's unmatched classes are background
        to the student, so its background logit becomes the logsumexp of background and those: the
        reduced softmax gives background their summed probability and every matched class its own."""
        t_cols = torch.tensor(self.teacher_labels, device=t_logits.device)
        unmatched = torch.ones(t_logits.shape[-1], dtype=torch.bool, device=t_logits.device)
        unmatched[t_cols] = False  # column 0 stays in: background itself
        t_background = t_logits[..., unmatched].logsumexp(dim=-1, keepdim=True)
        s_cols = torch.tensor([0, *self.student_labels], device=s_logits.device)
        return torch.cat([t_background, t_logits.index_select(-1, t_cols)], -1), s_logits.index_select(-1, s_cols)

    def relabel(self, output: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A detector's output (``boxes``, ``scores``, ``labels`` in the teacher's labels) in the
        dataset's labels; detections of an unmatched teacher class are dropped."""
        lookup = torch.zeros(self.num_teacher + 1, dtype=torch.long)  # 0: no dataset class
        lookup[list(self.teacher_labels)] = torch.tensor(self.student_labels, dtype=torch.long)
        labels = lookup.to(output["labels"].device)[output["labels"].clamp(0, self.num_teacher)]
        keep = labels > 0
        return {**output, "boxes": output["boxes"][keep], "scores": output["scores"][keep], "labels": labels[keep]}


class RelabeledDetector(nn.Module):
    """An evaluation view of a detector of other classes: its detections in the dataset's labels."""

    def __init__(self, model: nn.Module, match: ClassMatch) -> None:
        super().__init__()
        self.model, self.match = model, match

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return [self.match.relabel(output) for output in self.model(images)]


def teacher_categories(teacher: ModelConfig, classes: TeacherClasses | None) -> list[str] | None:
    """The teacher's category names in label order: given, or those of its torchvision weights
    name; None when unknown (then the teacher must have the dataset's classes, in its order)."""
    if classes is not None and classes.categories is not None:
        return list(classes.categories)
    return categories_for(teacher.weights) if is_weights_name(teacher.weights) else None


def class_match_for(
    teacher: ModelConfig, classes: TeacherClasses | None, dataset: Sequence[str]
) -> ClassMatch | None:
    """The match the distiller applies (None: the teacher's categories are unknown, so it has the
    dataset's classes); call after ``class_match_problems`` found nothing."""
    names = teacher_categories(teacher, classes)
    if names is None:
        return None
    return match_classes(dataset, names, classes.class_map if classes else None)[0]


def match_classes(
    dataset: Sequence[str], teacher: Sequence[str], class_map: Mapping[str, str] | None = None
) -> tuple[ClassMatch, list[Problem]]:
    """The match of each dataset class (by name, or through ``class_map``) and the problems with
    ``class_map`` or the teacher's names. Missing classes are listed in the match, not as problems."""
    class_map = class_map or {}
    problems = [
        Problem((*LOC, "class_map", key), f"{key!r} is not a class of the dataset: one of {list(dataset)}",
                "unknown_class")
        for key in class_map if key not in dataset
    ]
    teacher_label: dict[str, int] = {}
    for label, name in enumerate(teacher, start=1):
        if name not in PLACEHOLDERS:
            teacher_label.setdefault(name, label)
    named = [n for n in teacher if n not in PLACEHOLDERS]
    repeated = sorted({n for n in named if named.count(n) > 1})
    if repeated:
        problems.append(Problem((*LOC, "categories"), f"the teacher names classes {repeated} more than once",
                                "ambiguous_class"))
    for key, value in class_map.items():
        if key in dataset and value not in teacher_label:
            problems.append(Problem((*LOC, "class_map", key), f"{value!r} is not a class of the teacher",
                                    "unknown_class"))
    pairs, missing = [], []
    for label, name in enumerate(dataset, start=1):
        target = teacher_label.get(class_map.get(name, name))
        if target is None and name not in class_map:  # a bad class_map value is reported above
            missing.append(name)
        else:
            pairs.append((label, target))
    match = ClassMatch(
        student_labels=tuple(p[0] for p in pairs), teacher_labels=tuple(p[1] for p in pairs),
        num_student=len(dataset), num_teacher=len(teacher), missing=tuple(missing),
    )
    return match, problems


def class_match_problems(
    dataset: Sequence[str] | None,
    teacher: Sequence[str] | None,
    classes: TeacherClasses | None,
    *,
    teacher_num_classes: int | None = None,
) -> list[Problem]:
    """What keeps the teacher's classes from matching the dataset's (None: not known to the caller).
    Without teacher categories the count rule of ``gid_core.config.class_problems`` applies instead."""
    classes = classes or TeacherClasses()
    if teacher is None:
        if classes.class_map:
            return [Problem((*LOC, "class_map"), "the teacher's categories are not known, so classes cannot be "
                            "matched: give the teacher's categories", "unknown_class")]
        return []
    if teacher_num_classes is not None and len(teacher) != teacher_num_classes:
        return [Problem((*LOC, "categories"), f"{len(teacher)} teacher categories for the teacher's "
                        f"num_classes {teacher_num_classes}", "class_mismatch")]
    if dataset is None:
        return []
    match, problems = match_classes(dataset, teacher, classes.class_map)
    if match.missing and not classes.allow_missing_classes:
        problems.append(Problem(
            (*LOC, "categories"),  # the teacher's categories lack them (the service: the teacher's field)
            f"the teacher's categories lack {list(match.missing)}: map each to a teacher class in class_map, or "
            "set allow_missing_classes to distil them by features and relations only",
            "class_missing",
        ))
    elif match.missing and not match.student_labels:
        problems.append(Problem(
            (*LOC, "allow_missing_classes"),
            "no class of the dataset is a class of the teacher: GID's instance scores need at least one",
            "class_missing",
        ))
    return problems

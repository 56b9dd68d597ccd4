"""What GISM picks: the general instances of validation images at a distillation checkpoint.

The dashboard's "general instances" view shows, per image, the GIs the engine's own selection
(``GIDDistiller.select_instances``, i.e. ``gism.select_general_instances_batched``) picks between
the frozen teacher and the student at a checkpoint, beside both detectors' ordinary detections.
Usable without the service::

    inspector = GIInspector.from_job(JobConfig.model_validate_json(...), Path("checkpoints/ckpt_0000500.pt"))
    view = inspector.inspect(0)          # JSON-ready dict; inspector.image_png(0) is the picture

Every box is in the coordinates of the validation image as the engine reads it (resized to the
student's ``min_size``/``max_size``), which is the picture ``image_png`` returns.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes

from .classmap import class_match_for
from .config import JobConfig
from .data import CocoDetectionDataset
from .distill import GIDDistiller
from .models import build_detector, load_state_dict_checked, load_state_dict_file


def student_state(weights: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The student's state_dict from a training checkpoint (``.pt``: its ``model`` entry, the
    distiller's ``student.*`` keys) or from an export (``.safetensors``). Never unpickles."""
    path = Path(weights)
    if path.suffix != ".pt":
        return load_state_dict_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} is not a training checkpoint (no 'model' state)")
    if any(k.startswith("student.") for k in state):
        return {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return dict(state)


def _round(box: Tensor) -> list[float]:
    return [round(float(v), 2) for v in box]


class GIInspector:
    """A distiller (teacher + student at some weights) in eval mode and the job's validation set."""

    def __init__(self, distiller: GIDDistiller, dataset: CocoDetectionDataset) -> None:
        self.distiller = distiller.eval()
        self.dataset = dataset
        self.categories = [c["name"] for c in dataset.categories]

    @classmethod
    def from_job(cls, job: JobConfig, weights: str | os.PathLike[str]) -> "GIInspector":
        """``job`` must be a distillation job with a validation set; ``weights`` a checkpoint of it
        or its exported student. Runs on the CPU."""
        if job.kind != "distill" or job.teacher is None:
            raise ValueError("general instances exist only for distillation jobs")
        if job.data.val_annotations is None:
            raise ValueError("the job has no validation dataset")
        s = job.student
        dataset = CocoDetectionDataset(job.data.val_annotations, job.data.val_images, train=False,
                                       min_size=s.min_size, max_size=s.max_size)
        teacher = build_detector(job.teacher)
        student = build_detector(job.student, load_weights=False)
        load_state_dict_checked(student, student_state(weights), source=str(weights))
        # the match the engine trained with (gid_core.engine.build_training_model): a teacher of
        # other classes meets GISM through its columns of the dataset's classes only
        classes = class_match_for(job.teacher, job.teacher_classes, [c["name"] for c in dataset.categories])
        distiller = GIDDistiller(teacher, student, job.hyperparameters.distill, classes=classes)
        return cls(distiller, dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def image_png(self, index: int) -> bytes:
        image, _ = self.dataset[index]
        pixels = image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    @torch.no_grad()
    def inspect(self, index: int, *, score_threshold: float = 0.3, max_detections: int = 20) -> dict[str, Any]:
        """GIs of image ``index`` (score-descending) with each one's teacher and student box, and
        both detectors' detections above ``score_threshold``."""
        image, target = self.dataset[index]
        d = self.distiller
        return {
            "index": index,
            "image_id": target["image_id"],
            "height": int(image.shape[-2]),
            "width": int(image.shape[-1]),
            "categories": self.categories,
            "ground_truth": [{"box": _round(b), "label": int(lab)} for b, lab in zip(target["boxes"], target["labels"])],
            "general_instances": self._general_instances(image),
            "teacher": self._detections(d.teacher, image, score_threshold, max_detections),
            "student": self._detections(d.student, image, score_threshold, max_detections),
        }

    def _general_instances(self, image: Tensor) -> list[dict[str, Any]]:
        d = self.distiller
        images, _ = d.student.transform([image])  # as in training: both see the student's input
        t_out = d.view(d.teacher, images, d._anchors)
        s_out = d.view(d.student, images, d._anchors)
        # column c of the dense probabilities is dataset label labels[c]
        labels = list(range(1, len(self.categories) + 1))
        if d.classes is not None and d.view.per_class:  # as GIDDistiller.forward does before GISM
            t_out, s_out = d.classes.restrict(t_out, s_out)
            labels = list(d.classes.student_labels)
        gi = d.select_instances(t_out, s_out)  # the engine's own GISM call
        t_prob, s_prob, t_box, s_box = t_out.probs[0], s_out.probs[0], t_out.boxes[0], s_out.boxes[0]
        discrepancy = (t_prob - s_prob).abs()
        gi_score = discrepancy.amax(dim=1)
        back = (images.image_sizes[0], tuple(image.shape[-2:]))  # model input -> dataset image
        dense_labels = d.view.per_class  # Faster R-CNN: RPN objectness only
        out = []
        for box, score in zip(gi.boxes, gi.scores):
            # The prediction GISM took this GI from: its box is that prediction's teacher or student
            # box, bit for bit, and its score that prediction's GI score.
            hit = ((t_box == box).all(1) | (s_box == box).all(1)) & (gi_score == score)
            r = int(hit.nonzero()[0, 0])
            c = int(discrepancy[r].argmax())
            teacher_wins = bool(t_prob[r].max() > s_prob[r].max())
            out.append({
                "box": _round(resize_boxes(box[None], *back)[0]),
                "teacher_box": _round(resize_boxes(t_box[r][None], *back)[0]),
                "student_box": _round(resize_boxes(s_box[r][None], *back)[0]),
                "source": "teacher" if teacher_wins else "student",
                "score": round(float(score), 4),
                "label": labels[c] if dense_labels else None,
                "teacher_prob": round(float(t_prob[r, c]), 4),
                "student_prob": round(float(s_prob[r, c]), 4),
            })
        return out

    @staticmethod
    def _detections(model, image: Tensor, score_threshold: float, max_detections: int) -> list[dict[str, Any]]:
        det = model([image])[0]  # eval mode: post-processed, in the image's coordinates
        keep = det["scores"] >= score_threshold
        rows = zip(det["boxes"][keep], det["labels"][keep], det["scores"][keep])
        return [{"box": _round(b), "label": int(lab), "score": round(float(s), 4)} for b, lab, s in rows][:max_detections]

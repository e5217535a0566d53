"""The training stages: magnitude pruning with fine-tuning, and distillation into a smaller student.

Both take the input model object (Keras or PyTorch) and return a new model object of the same
framework, which the build then converts, quantizes, gates and measures like the original. Training
data comes from the stage's ``data`` (raw samples run through the bundle's own preprocessing, in
mini-batches); targets are the *teacher's* outputs on those samples (so the data need no labels),
mixed with the labels when the data has them and the task is classification (pruning fine-tune).

Libraries: Keras has no pruning API of its own, and tensorflow-model-optimization 0.8 works on
``tf_keras`` (Keras 2) models only and would pull a second TensorFlow package and downgrade absl-py
(ADR 0004); so Keras pruning here is the same recipe in a few lines: per-layer magnitude masks with a
polynomial sparsity schedule, re-applied after every batch. PyTorch uses ``torch.nn.utils.prune``
(``global_unstructured`` with ``L1Unstructured``), whose masks hold during fine-tuning and are made
permanent with ``prune.remove``.

What unstructured sparsity buys is reported, not assumed: the ONNX and TFLite files keep dense
tensors, so the file (and a device's download) is the same size, the compressed size is smaller, and
the CPU runtimes run no faster. A distilled student with fewer channels or layers is smaller and
faster for real.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from converter.errors import ConverterError, ModelInputError
from converter.stage_spec import StageSpec


class StageError(ConverterError):
    """A training stage (pruning, distillation) failed."""

    default_step = "train"


Featurize = Callable[[np.ndarray], dict[str, np.ndarray]]


def _batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for i in range(0, n, size):
        yield order[i : i + size]


# ---- Keras -----------------------------------------------------------------------------------------------

def _keras_prunable(model: Any) -> list[Any]:
    return [layer for layer in model.layers
            if type(layer).__name__ in ("Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D")]


def _keras_masks(layers: list[Any], sparsity: float) -> list[np.ndarray]:
    masks = []
    for layer in layers:
        w = np.asarray(layer.get_weights()[0])
        k = round(sparsity * w.size)
        if k <= 0:
            masks.append(np.ones_like(w, dtype=bool))
            continue
        threshold = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
        masks.append(np.abs(w) > threshold)
    return masks


def _keras_apply(layers: list[Any], masks: list[np.ndarray]) -> None:
    for layer, mask in zip(layers, masks, strict=True):
        weights = layer.get_weights()
        weights[0] = weights[0] * mask
        layer.set_weights(weights)


def _keras_targets(teacher: Any, feats: dict[str, np.ndarray]) -> np.ndarray:
    x = [feats[k] for k in feats] if len(feats) > 1 else next(iter(feats.values()))
    out = teacher(x, training=False)
    return np.asarray(out[0] if isinstance(out, (list, tuple)) else out)


def keras_prune(teacher: Any, stage: StageSpec, raw: np.ndarray, labels: np.ndarray | None,
                featurize: Featurize, task: str) -> tuple[Any, dict[str, Any]]:
    """Magnitude-prune every Dense/Conv kernel to ``stage.sparsity``, fine-tuning while the masks grow."""
    import keras

    keras.utils.set_random_seed(stage.seed)
    model = keras.models.clone_model(teacher)
    model.set_weights(teacher.get_weights())
    layers = _keras_prunable(model)
    if not layers:
        raise StageError("the Keras model has no Dense or Conv layer to prune", fix="drop the pruned-* variants")
    feats = featurize(raw)
    x = next(iter(feats.values()))
    soft = _keras_targets(teacher, feats)
    classify = task == "classification" and soft.ndim == 2 and soft.shape[1] > 1
    if classify and labels is not None and labels.dtype.kind in "iu":
        target = 0.5 * soft + 0.5 * np.eye(soft.shape[1], dtype=np.float32)[labels]  # labels and teacher
    else:
        target = soft
    loss = "categorical_crossentropy" if classify else "mse"
    model.compile(optimizer=keras.optimizers.Adam(stage.learning_rate), loss=loss)
    rng = np.random.default_rng(stage.seed)
    for epoch in range(stage.epochs):
        # polynomial schedule (Zhu & Gupta 2017, as in tensorflow-model-optimization): most pruning early
        s = stage.sparsity * (1.0 - (1.0 - (epoch + 1) / stage.epochs) ** 3)
        masks = _keras_masks(layers, s)
        _keras_apply(layers, masks)
        for idx in _batches(len(x), stage.batch_size, rng):
            model.train_on_batch(x[idx], target[idx])
            _keras_apply(layers, masks)
    masks = _keras_masks(layers, stage.sparsity)
    _keras_apply(layers, masks)
    zeros = sum(int(np.sum(~m)) for m in masks)
    total = sum(m.size for m in masks)
    return model, {"method": "magnitude, unstructured, per layer (Keras masks)", "sparsity": round(zeros / total, 4),
                   "pruned_layers": [layer.name for layer in layers], "epochs": stage.epochs,
                   "samples": len(x)}


def _keras_student(teacher: Any, width: float) -> Any:
    """The teacher's architecture with every Dense/Conv layer but the output one narrowed to ``width``."""
    import keras

    config = copy.deepcopy(teacher.get_config())
    layers = config["layers"]
    trainable = [i for i, layer in enumerate(layers) if layer["class_name"] in ("Dense", "Conv1D", "Conv2D")]
    for i in trainable[:-1]:
        cfg = layers[i]["config"]
        key = "units" if "units" in cfg else "filters"
        cfg[key] = max(1, round(cfg[key] * width))
    for layer in layers:
        layer["config"]["name"] = "student_" + layer["config"]["name"]
        layer.pop("build_config", None)  # the teacher's input shapes per layer no longer hold
    cls = keras.Sequential if isinstance(teacher, keras.Sequential) else keras.Model
    return cls.from_config(config)


def keras_distill(teacher: Any, student: Any | None, stage: StageSpec, raw: np.ndarray,
                  featurize: Featurize, task: str) -> tuple[Any, dict[str, Any]]:
    """Train the student on the teacher's outputs (soft targets) for the unlabeled samples."""
    import keras

    keras.utils.set_random_seed(stage.seed)
    derived = student is None
    model: Any = _keras_student(teacher, stage.width) if derived else student
    feats = featurize(raw)
    x = next(iter(feats.values()))
    soft = _keras_targets(teacher, feats)
    classify = task == "classification" and soft.ndim == 2 and soft.shape[1] > 1
    if classify and stage.temperature != 1.0:
        logits = np.log(np.clip(soft, 1e-8, 1.0)) / stage.temperature
        soft = np.exp(logits - logits.max(axis=1, keepdims=True))
        soft = soft / soft.sum(axis=1, keepdims=True)
    model.compile(optimizer=keras.optimizers.Adam(stage.learning_rate),
                  loss="categorical_crossentropy" if classify else "mse")
    rng = np.random.default_rng(stage.seed)
    for _ in range(stage.epochs):
        for idx in _batches(len(x), stage.batch_size, rng):
            model.train_on_batch(x[idx], soft[idx])
    return model, {"method": "distillation on the teacher's outputs (Keras)",
                   "student": f"derived: width x{stage.width}" if derived else stage.student,
                   "teacher_params": int(teacher.count_params()), "student_params": int(model.count_params()),
                   "epochs": stage.epochs, "samples": len(x)}


# ---- PyTorch ---------------------------------------------------------------------------------------------

def _torch_outputs(module: Any, feats: dict[str, np.ndarray], names: list[str]) -> Any:
    import torch

    out = module(*(torch.from_numpy(np.ascontiguousarray(feats[n])) for n in names))
    return out[0] if isinstance(out, (tuple, list)) else out


def _torch_loss(task: str) -> Callable[[Any, Any], Any]:
    import torch

    if task == "embedding":
        def cosine(s: Any, t: Any) -> Any:
            return (1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
        return cosine
    return torch.nn.functional.mse_loss


def _torch_train(module: Any, teacher: Any, stage: StageSpec, raw: np.ndarray, featurize: Featurize,
                 names: list[str], task: str) -> float:
    """Fit ``module`` to the teacher's outputs, batch by batch (features made per batch); returns the last loss."""
    import torch

    torch.manual_seed(stage.seed)
    loss_fn = _torch_loss(task)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=stage.learning_rate)
    rng = np.random.default_rng(stage.seed)
    module.train()
    last = float("nan")
    for _ in range(stage.epochs):
        for idx in _batches(len(raw), stage.batch_size, rng):
            feats = featurize(raw[idx])
            with torch.no_grad():
                target = _torch_outputs(teacher, feats, names)
            loss = loss_fn(_torch_outputs(module, feats, names), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = float(loss.detach())
    module.eval()
    return last


def torch_prune(teacher: Any, stage: StageSpec, raw: np.ndarray, featurize: Featurize, names: list[str],
                task: str) -> tuple[Any, dict[str, Any]]:
    """Global L1 magnitude pruning of every Linear/Conv weight, fine-tuned on the teacher's outputs."""
    import torch
    from torch.nn.utils import prune

    teacher.eval()
    module = copy.deepcopy(teacher)
    params = [(m, "weight") for m in module.modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    if not params:
        raise StageError("the PyTorch model has no Linear or Conv layer to prune", fix="drop the pruned-* variants")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=stage.sparsity)
    loss = _torch_train(module, teacher, stage, raw, featurize, names, task)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    total = sum(m.weight.numel() for m, _ in params)
    for m, name in params:
        prune.remove(m, name)  # type: ignore[no-untyped-call]  # torch's prune module is untyped
    return module, {"method": "torch.nn.utils.prune.global_unstructured (L1), fine-tuned on the teacher's outputs",
                    "sparsity": round(zeros / total, 4), "pruned_tensors": len(params), "epochs": stage.epochs,
                    "final_loss": round(loss, 6), "samples": len(raw)}


def _largest_layer_list(module: Any) -> tuple[Any, str, Any]:
    import torch

    best: tuple[Any, str, Any] | None = None
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.ModuleList) and (best is None or len(child) > len(best[2])):
                best = (parent, name, child)
    if best is None:
        raise StageError("the PyTorch model has no layer list (nn.ModuleList) to take layers from",
                         fix="give [distill] student = \"recipe.py:function\" returning the student")
    return best


def torch_student(teacher: Any, keep: tuple[int, ...]) -> tuple[Any, str]:
    """A copy of the teacher keeping only the ``keep`` entries of its largest ``nn.ModuleList``."""
    import torch

    student = copy.deepcopy(teacher)
    parent, name, layers = _largest_layer_list(student)
    if max(keep) >= len(layers):
        raise StageError(f"[distill] keep_layers {list(keep)} but the model's {name} has {len(layers)} entries",
                         fix=f"use indices below {len(layers)}")
    setattr(parent, name, torch.nn.ModuleList([layers[i] for i in keep]))
    for sub in student.modules():  # Hugging Face models also read the layer count from their config
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(keep)
    return student, f"derived: layers {list(keep)} of {len(layers)} ({name}), initialised from the teacher"


def torch_distill(teacher: Any, student: Any | None, stage: StageSpec, raw: np.ndarray, featurize: Featurize,
                  names: list[str], task: str) -> tuple[Any, dict[str, Any]]:
    """Train the student (given, or the teacher with fewer layers) on the teacher's outputs."""
    teacher.eval()
    if student is None:
        _, _, layers = _largest_layer_list(teacher)
        keep = stage.keep_layers or tuple(range(0, len(layers), 2))
        student, how = torch_student(teacher, keep)
    else:
        how = stage.student or "given"
    loss = _torch_train(student, teacher, stage, raw, featurize, names, task)

    def count(m: Any) -> int:
        return int(sum(p.numel() for p in m.parameters()))
    return student, {"method": "distillation on the teacher's outputs (PyTorch, cosine loss for embeddings)",
                     "student": how, "teacher_params": count(teacher), "student_params": count(student),
                     "epochs": stage.epochs, "final_loss": round(loss, 6), "samples": len(raw)}


def run_stage(stage: StageSpec, kind: str, model: Any, student: Any | None, raw: np.ndarray,
              labels: np.ndarray | None, featurize: Featurize, names: list[str], task: str
              ) -> tuple[Any, dict[str, Any]]:
    """Dispatch on the stage and the framework of ``model`` (``keras`` or ``torch``)."""
    if kind == "keras":
        if stage.kind == "prune":
            return keras_prune(model, stage, raw, labels, featurize, task)
        return keras_distill(model, student, stage, raw, featurize, task)
    if kind == "torch":
        if stage.kind == "prune":
            return torch_prune(model, stage, raw, featurize, names, task)
        return torch_distill(model, student, stage, raw, featurize, names, task)
    raise ModelInputError(f"[{stage.kind}] trains Keras and PyTorch models; this model is {kind}",
                          fix=f"drop the {stage.kind} variants, or give the Keras/PyTorch original")

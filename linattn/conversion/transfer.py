"""Attention transfer (LoLCATs' first stage, docs/methods.md §10): train only a linearized model's
new parameters so that every replaced layer reproduces its own softmax attention on the same
inputs. All layers learn at once in one forward pass: in "transfer" mode each layer returns its
teacher's (exact) output, so the next layer sees the original activations, and keeps its student's
loss; the losses are summed and the feature maps (and the hybrid's scales) take one Adam step.
"""
import contextlib
import itertools
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional

import torch

from .attention import LOSSES, LinearizedAttention


def linearized_layers(model: torch.nn.Module) -> Dict[str, LinearizedAttention]:
    """The model's LinearizedAttention modules by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LinearizedAttention)}


def set_mode(model: torch.nn.Module, mode: str) -> None:
    """"student" (the linearized model), "teacher" (the original softmax attention) or "transfer"."""
    for layer in linearized_layers(model).values():
        if mode not in ("student", "teacher", "transfer"):
            raise ValueError(f"linattn: mode must be 'student', 'teacher' or 'transfer', got {mode!r}")
        layer.mode = mode


def _run(model, batch):
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


@contextlib.contextmanager
def _training_new_parameters(model, where: str, batches, steps: int, lr: float, progress: bool, desc: str):
    """Checks a transfer's arguments, makes only the linearized layers trainable (Adam over them),
    the model in eval mode (dropout off: the teacher is the model as it predicts); yields
    (layers, optimizer, the (step, batch) pairs to run, the progress bar or None). Afterwards the
    model is in "student" mode, its requires_grad flags and training mode as they were."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{where}: steps must be an int >= 0, got {steps!r}")
    layers = linearized_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no linearized layers; run linattn.linearize first")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{where}: batches is empty")
    trainable = [p for layer in layers.values() for p in layer.parameters()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc)
    model.eval()
    try:
        yield layers, torch.optim.Adam(trainable, lr=lr), zip(range(steps), itertools.cycle(batches)), bar
    finally:
        if bar is not None:
            bar.close()
        set_mode(model, "student")
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _report(bar, loss: float) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")


def attention_transfer(model: torch.nn.Module, batches: Iterable, *, steps: int = 100, lr: float = 1e-2,
                       loss: str = "output_mse", progress: bool = True,
                       callback=None) -> Dict[str, List[float]]:
    """Trains the linearized layers of `model` (linattn.linearize) to match their softmax attention.

    Args:
        model: a model linearize() converted; only its LinearizedAttention parameters change.
        batches: model inputs (dicts of keyword arguments, or tensors), cycled through for `steps`.
        steps, lr: Adam steps and learning rate.
        loss: "output_mse" (each layer's output against its softmax output) or "attention_ce"
            (cross-entropy of the student's attention weights under the teacher's; O(T²) memory).
        progress: a tqdm progress bar.
        callback: called as callback(step, history) after every step (e.g. to evaluate).

    Returns:
        history: per-layer loss at every step, by layer name, plus "total" (their sum).
    Afterwards the model is back in "student" mode (linear attention only), with its parameters'
    requires_grad flags and training mode as they were.
    """
    if loss not in LOSSES:
        raise ValueError(f"linattn.attention_transfer: loss must be one of {LOSSES}, got {loss!r}")
    with _training_new_parameters(model, "linattn.attention_transfer", batches, steps, lr, progress,
                                  "attention transfer") as (layers, optimizer, schedule, bar):
        history: Dict[str, List[float]] = {name: [] for name in layers}
        history["total"] = []
        set_mode(model, "transfer")
        for layer in layers.values():
            layer.loss_kind = loss
        for step, batch in schedule:
            optimizer.zero_grad(set_to_none=True)
            _run(model, batch)
            losses = [layer.last_loss for layer in layers.values()]
            if any(value is None for value in losses):
                raise RuntimeError("linattn.attention_transfer: a linearized layer did not run on this batch")
            total = torch.stack(losses).sum()
            total.backward()
            optimizer.step()
            for name, value in zip(layers, losses):
                history[name].append(float(value.detach()))
            history["total"].append(float(total.detach()))
            for layer in layers.values():
                layer.last_loss = None
            _report(bar, history["total"][-1])
            if callback is not None:  # sees the linearized model
                set_mode(model, "student")
                callback(step, history)
                set_mode(model, "transfer")
    return history


def _model_output(output) -> torch.Tensor:
    """The tensor an end-to-end stage matches: the last hidden states, else the logits."""
    for name in ("last_hidden_state", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError("linattn.end_to_end_transfer: the model's output has neither last_hidden_state nor logits; pass "
                    "select= to pick the tensor to match")


E2E_LOSSES = ("mse", "kl")


def end_to_end_transfer(model: torch.nn.Module, batches: Iterable, *, steps: int = 100, lr: float = 1e-3,
                        select=None, loss: str = "mse", progress: bool = True,
                        callback=None) -> Dict[str, List[float]]:
    """The stage after attention_transfer: trains the same new parameters so that the linearized
    model's final output matches the original model's (the teacher mode) on the same inputs, by
    mean squared error over the real tokens (the batch's attention_mask, when it has one).

    Each step runs the model twice (the original without gradients, the linearized one with
    them, its backward through every layer): on all-MiniLM-L6-v2 a step took 1.4x a layer-wise
    one. It corrects the errors that layer-wise fitting leaves and that compound through layers.

    Args:
        model, batches, steps, lr, progress, callback: as attention_transfer.
        select: maps the model's output to the tensor to match (default: last_hidden_state, else
            logits).
        loss: "mse" (mean squared error of the selected tensors) or "kl" (the selected tensors are
            logits over the last dimension: KL(original ‖ linearized) per token, a language
            model's distillation loss).
    Returns:
        history: {"total": the loss at every step}.
    """
    if loss not in E2E_LOSSES:
        raise ValueError(f"linattn.end_to_end_transfer: loss must be one of {E2E_LOSSES}, got {loss!r}")
    select = _model_output if select is None else select
    history: Dict[str, List[float]] = {"total": []}
    with _training_new_parameters(model, "linattn.end_to_end_transfer", batches, steps, lr, progress,
                                  "end-to-end transfer") as (_, optimizer, schedule, bar):
        for step, batch in schedule:
            set_mode(model, "teacher")
            with torch.no_grad():
                target = select(_run(model, batch)).float()
            set_mode(model, "student")
            optimizer.zero_grad(set_to_none=True)
            output = select(_run(model, batch)).float()
            if loss == "mse":
                error = (output - target) ** 2
            else:  # per token, summed over the vocabulary; averaged below as MSE is over features
                teacher = torch.log_softmax(target, -1)
                error = (teacher.exp() * (teacher - torch.log_softmax(output, -1))).sum(-1, keepdim=True)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if mask is not None and mask.shape == error.shape[:2]:
                rows = mask.to(error.dtype)[..., None]
                value = (error * rows).sum() / (rows.sum() * error.shape[-1]).clamp_min(1)
            else:
                value = error.mean()
            value.backward()
            optimizer.step()
            history["total"].append(float(value.detach()))
            _report(bar, history["total"][-1])
            if callback is not None:
                callback(step, history)
    return history


def plot_transfer(history: Dict[str, List[float]], path: Optional[str] = None, *, title: str = "attention transfer"):
    """Plots each layer's loss against the step (log scale); saves to `path` when given. Returns
    the matplotlib figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, values in history.items():
        if name == "total":
            continue
        axes.plot(values, label=name, linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    if len(history) <= 13:
        axes.legend(fontsize=6)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure

"""The Fisher diagonal of the quantizable weights (SqueezeLLM's saliency).

F_jk = sum over calibration sequences of (d loss_s / d w_jk)^2, with loss_s the
mean next-token negative log-likelihood of sequence s: the empirical Fisher,
one backward pass per sequence. It ranks weights within a layer (``scoring =
"fisher"``); it is not used for the QP: docs/method.md ("What was measured")
records that this estimator of the loss failed. The estimate is noisy with few sequences, so
fewer than ``MIN_SEQUENCES`` get a warning that says how many it had.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from lwq.adapters import ModelAdapter
from lwq.calibration import CalibrationSet
from lwq.errors import NumericalError

log = logging.getLogger(__name__)

MIN_SEQUENCES = 32


def fisher_diagonal(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    calib: CalibrationSet,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Squared per-sequence gradients of every quantizable weight, (d_out, d_in) each."""
    n = calib.n_samples
    if n < MIN_SEQUENCES:
        log.warning(
            "the Fisher estimate had only %d calibration sequences (%d tokens); use at least "
            "%d (calib.n_samples) for a stable ranking",
            n,
            n * calib.seq_len,
            MIN_SEQUENCES,
        )
    modules = dict(adapter.iter_layers(model))
    params: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        w = mod.weight
        assert isinstance(w, torch.Tensor)
        params[name] = w
    everything = list(model.parameters())
    was = [q.requires_grad for q in everything]
    device = next(iter(params.values())).device
    acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in params.items()}
    try:
        for q in everything:
            q.requires_grad_(False)
        for w in params.values():
            w.requires_grad_(True)
        for seq in tqdm(calib.input_ids, desc="fisher", disable=not progress):
            ids = seq[None, :].to(device)
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, list(params.values()))
            for (name, _), g in zip(params.items(), grads, strict=True):
                if not torch.isfinite(g).all():
                    raise NumericalError(
                        f"{name}: NaN or inf in the gradient of the calibration loss "
                        "(use method.scoring=obs, or check the model's weights)"
                    )
                acc[name] += g.float().square()
    finally:
        for q, flag in zip(everything, was, strict=True):
            q.requires_grad_(flag)
    # Conv1D stores (d_in, d_out): read it like the weight.
    return {name: (acc[name].T if adapter.transposed else acc[name]).contiguous() for name in acc}

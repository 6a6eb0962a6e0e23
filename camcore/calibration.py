"""Calibration: fit the temperature the one forward recipe divides logits by, and measure the result.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T > 0
for all classes, logits / T before the softmax, fitted by minimising the negative log-likelihood
on held-out images. Dividing every logit of an image by the same positive number never changes
which one is largest, so accuracy is untouched; only how sure the model says it is changes.

The fit is on the *served* probabilities: with flip test-time augmentation the service answers
mean(softmax(z_image / T), softmax(z_mirror / T)), and that mean, not a single view's softmax, is
what must mean what it says. So :func:`fit_temperature` takes the logits of every view.

The metrics are written out here (a few lines each) rather than imported from torchmetrics:
camcore depends on nothing the serving image lacks (torchmetrics is a training extra), the HTTP
benchmark scores the service's answers with the same code, and torchmetrics has no reliability-bin
output or multiclass Brier score to reuse anyway. ``tests/test_calibration.py`` checks the ECE
against torchmetrics' ``multiclass_calibration_error`` (15 bins, l1) and against numpy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from camcore.forward import view_mean_probabilities

ECE_BINS = 15  # Guo et al.'s choice, and what the issue's figures use
# The range T is searched in. A held-out set the model gets all right (or all wrong) has no finite
# optimum: its NLL keeps falling as T -> 0 (or infinity); such a fit stops at a bound instead.
T_MIN, T_MAX = 0.05, 20.0


def served_probabilities(view_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(views, N, classes) logits -> (N, classes) probabilities: the recipe's own step 4
    (:func:`camcore.forward.view_mean_probabilities`), on logits stacked by view."""
    views = view_logits.shape[0]
    return view_mean_probabilities(view_logits.float().flatten(0, 1), temperature, views)


def _served_nll(view_logits: torch.Tensor, labels: torch.Tensor, log_temperature: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the served probabilities, in log space throughout (no underflow at small T)."""
    log_probs = (view_logits / log_temperature.exp()).log_softmax(-1)  # (views, N, classes)
    views = view_logits.shape[0]
    log_served = torch.logsumexp(log_probs, dim=0) - math.log(views)  # log of the mean over views
    return -log_served.gather(1, labels[:, None]).mean()


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """The fit's tensors are tiny ((views, N, 10)); splitting them over intra-op threads only adds
    synchronisation, and on a busy 2-core machine that cost 4.6 ms per NLL evaluation against 0.03 ms
    on one thread (N=20; 75 ms against 3.4 ms at N=6,000). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_temperature(view_logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T that minimises the NLL of the served probabilities on held-out images.

    ``view_logits`` is (views, N, classes) fp32 (one view, or the image and its mirror); ``labels``
    is (N,). Optimised over log T, so T stays positive, with L-BFGS and a strong-Wolfe line search
    (as Guo et al.'s reference code). With one view the NLL is convex in 1/T; averaging views keeps
    it unimodal in practice, and the result is checked against a coarse grid so a bad start cannot
    leave a poor local minimum unnoticed. The result lies in [``T_MIN``, ``T_MAX``].
    """
    if view_logits.dim() == 2:
        view_logits = view_logits[None]
    if view_logits.dim() != 3 or view_logits.shape[1] != len(labels) or len(labels) == 0:
        raise ValueError(
            f"expected (views, N, classes) logits for {len(labels)} labels, got {tuple(view_logits.shape)}"
        )
    # Callers often hold inference-mode tensors (ServedForward output); copies made with autograd on can be fitted.
    with torch.inference_mode(False), torch.enable_grad(), _one_intra_op_thread():
        view_logits = view_logits.detach().to(torch.float64, copy=True)
        labels = labels.detach().to(torch.int64, copy=True)
        # Start from the best of a coarse grid over the allowed range, then refine.
        low, high = math.log(T_MIN), math.log(T_MAX)
        grid = torch.linspace(low, high, 25, dtype=torch.float64)  # steps of x1.28
        with torch.no_grad():
            losses = torch.stack([_served_nll(view_logits, labels, g) for g in grid])
        log_t = grid[losses.argmin()].clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = _served_nll(view_logits, labels, log_t)
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            refined = log_t.detach().nan_to_num(nan=high).clamp(low, high)
            best = refined if _served_nll(view_logits, labels, refined) <= losses.min() else grid[losses.argmin()]
    return float(best.exp())


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin (lower, upper]: how sure the model said it was against how often it was right."""

    lower: float
    upper: float
    count: int
    confidence: float | None  # mean top-1 probability of the images in the bin (None when empty)
    accuracy: float | None  # fraction of them whose top-1 class was right


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Top-1 reliability diagram data: image m/M < confidence <= (m+1)/M falls in bin m (Guo et al.)."""
    confidence, predicted = probabilities.float().max(1)
    correct = (predicted == labels).float()
    index = (confidence * n_bins).ceil().long().sub(1).clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence.double())
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct.double())
    bins = []
    for m in range(n_bins):
        n = int(counts[m])
        bins.append(
            ReliabilityBin(
                lower=m / n_bins,
                upper=(m + 1) / n_bins,
                count=n,
                confidence=float(conf_sum[m] / n) if n else None,
                accuracy=float(acc_sum[m] / n) if n else None,
            )
        )
    return bins


def expected_calibration_error(bins: list[ReliabilityBin]) -> float:
    """Top-1 ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    total = sum(b.count for b in bins)
    return sum(b.count * abs(b.accuracy - b.confidence) for b in bins if b.count) / total


def negative_log_likelihood(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p(true class). A probability that underflowed to 0 counts as the smallest fp32 normal
    (NLL ~87) rather than infinity, so one image cannot make the mean meaningless."""
    p_true = probabilities.double().gather(1, labels.long()[:, None]).squeeze(1)
    return float(-p_true.clamp_min(torch.finfo(torch.float32).tiny).log().mean())


def brier_score(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of the squared distance to the one-hot label, summed over classes (0 best, 2 worst)."""
    one_hot = torch.nn.functional.one_hot(labels.long(), probabilities.shape[1]).double()
    return float((probabilities.double() - one_hot).pow(2).sum(1).mean())


@dataclass(frozen=True)
class CalibrationReport:
    """What model.json and /health carry for one way of serving (one TTA mode, one temperature)."""

    images: int
    accuracy: float
    ece: float
    nll: float
    brier: float
    mean_confidence: float
    reliability: list[ReliabilityBin]

    def to_json(self, digits: int = 5) -> dict:
        def rounded(value: object) -> object:
            return round(value, digits) if isinstance(value, float) else value

        out = {k: rounded(v) for k, v in asdict(self).items() if k != "reliability"}
        out["reliability"] = [{k: rounded(v) for k, v in asdict(b).items()} for b in self.reliability]
        return out


def calibration_report(probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> CalibrationReport:
    """ECE (top-1, ``n_bins`` equal-width bins), NLL, Brier and the reliability bins of served probabilities."""
    bins = reliability_bins(probabilities, labels, n_bins)
    confidence, predicted = probabilities.float().max(1)
    return CalibrationReport(
        images=len(labels),
        accuracy=float((predicted == labels).double().mean()),
        ece=expected_calibration_error(bins),
        nll=negative_log_likelihood(probabilities, labels),
        brier=brier_score(probabilities, labels),
        mean_confidence=float(confidence.double().mean()),
        reliability=bins,
    )

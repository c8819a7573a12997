"""Pure math on tensors and arrays: no models, no files.

Everything here is small enough to check against numpy/scipy/sklearn by hand, and the
tests do exactly that.
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Float
from torch import Tensor


def mean_difference(
    pos: Float[Tensor, "n_pos *shape"], neg: Float[Tensor, "n_neg *shape"]
) -> Float[Tensor, "*shape"]:
    """mean(pos) - mean(neg), accumulated in float64 and returned as float32."""
    return (pos.double().mean(0) - neg.double().mean(0)).float()


def unit(v: Float[Tensor, "... d"], eps: float = 1e-12) -> Float[Tensor, "... d"]:
    """Unit vector(s) along the last axis."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def projection(x: Float[Tensor, "... d"], v: Float[Tensor, " d"]) -> Float[Tensor, "..."]:
    """Scalar projection of x onto the direction of v: x . v_hat."""
    return (x.to(v.dtype) @ unit(v)).to(x.dtype)


def ablate(x: Float[Tensor, "... d"], v: Float[Tensor, " d"]) -> Float[Tensor, "... d"]:
    """Remove the component of x along v: x - (x . v_hat) v_hat."""
    v_hat = unit(v.to(x.dtype))
    return x - (x @ v_hat).unsqueeze(-1) * v_hat


def cosine(a: Float[Tensor, "... d"], b: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
    """Cosine similarity along the last axis, computed in float64."""
    a, b = a.double(), b.double()
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)).float()


def cosine_matrix(vs: Float[Tensor, "n d"]) -> Float[Tensor, "n n"]:
    """Pairwise cosine similarity of the rows of vs."""
    u = unit(vs.double())
    return (u @ u.T).float()


def incremental(v: Float[Tensor, "layers d"]) -> Float[Tensor, "layers d"]:
    """Layer-incremental vectors v_L - v_{L-1}; layer 0 (the embedding) keeps v_0."""
    out = v.clone()
    out[1:] = v[1:] - v[:-1]
    return out


def pearson(x, y) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (t test with n-2 degrees of freedom)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 3:
        raise ValueError(f"pearson needs at least 3 points, got {n}: collect more samples.")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc**2).sum() * (yc**2).sum()))
    if denom == 0.0:
        raise ValueError("pearson is undefined when one variable is constant.")
    r = float(np.clip((xc * yc).sum() / denom, -1.0, 1.0))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt((n - 2) / (1 - r * r))
    from scipy.stats import t as student_t

    return r, float(2 * student_t.sf(abs(t), n - 2))


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative examples.")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(
    stat, *arrays, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of stat(*arrays), resampling the rows of all arrays together."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n < 3:
        raise ValueError(f"a bootstrap CI needs at least 3 points, got {n}.")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            vals.append(stat(*(a[idx] for a in arrays)))
        except ValueError:  # a degenerate resample (e.g. constant); skip it
            continue
    if not vals:
        raise ValueError("every bootstrap resample was degenerate: the data has no spread.")
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mean_ci(x, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a normal-approximation confidence interval (t quantile for small n)."""
    x = np.asarray([v for v in x if v is not None and not np.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values to average: every score is missing.")
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    from scipy.stats import t as student_t

    h = float(student_t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - h, m + h


def weighted_score(top_logprobs: dict[str, float], min_mass: float = 0.25) -> float | None:
    """The paper's judge score: sum(k p(k)) / sum(p(k)) over tokens that parse as integers
    in [0, 100]; None (missing) when that mass is below min_mass."""
    total = weighted = 0.0
    for tok, lp in top_logprobs.items():
        t = tok.strip()
        if not t.isdigit():
            continue
        k = int(t)
        if 0 <= k <= 100:
            p = math.exp(lp)
            total += p
            weighted += k * p
    if total < min_mass:
        return None
    return weighted / total

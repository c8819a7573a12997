"""Monitoring: predict a trait from the last prompt token, before any token is generated.

Five-minute tour::

    proj = project(model, convs, vector, layer=20)        # one batched run_with_cache pass
    proj.prompt_last, proj.response_avg, proj.tokens[i]   # three views of x . v_hat

    gens = generate_monitored(model, prompts, vector, layer=20)
    gens[i].prompt_last      # from the prefill pass that starts generation (no extra pass)
    gens[i].response_tokens  # one projection per generated token, recorded while decoding

    run = run_monitor(model, "runs/evil", "evil", layer=20, experiment="spectrum",
                      out_dir="runs/monitor-evil")
    run.summary.overall.r, run.summary.overall.ci_low, run.summary.classifier.auroc

The projection is the scalar ``x . v_hat`` of the residual stream at persona_lens layer ``L``
(HF ``hidden_states[L]``; at the last layer after the final norm, like recorded activations)
onto the unit persona vector at that layer.

Generation-time monitoring uses the steering module's hook mechanism: a read-only
TransformerLens hook at ``hook_name(L)`` plus :func:`persona_lens.steering.track_passes`,
which says whether a forward pass is the prefill. Both generation paths use a KV cache, so
the hook sees the whole left-padded prompt once (position -1 is every row's last prompt
token) and then one position per decode step: the token fed at step ``t`` is generated
token ``t - 1``. The last generated token is never fed back when generation stops at
``max_new_tokens``, so its projection is NaN (it would take one more forward pass).

Experiments (:func:`run_monitor`): condition x evaluation question x sample, where the
conditions are the trait's 8-prompt system-prompt spectrum or 0/5/10/15/20 many-shot
example turns. Each row keeps the last-prompt-token projection, the response and its
trait score; ``projections.jsonl`` grows as rows are generated and judged, so a killed run
resumes without generating a finished row again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from persona_lens import ops
from persona_lens.chat import ChatPrompt, format_chat
from persona_lens.generation import SamplingParams, generate_ids
from persona_lens.models import hook_name, model_info
from persona_lens.runio import append_jsonl, read_jsonl, write_atomic
from persona_lens.steering import PassInfo, track_passes
from persona_lens.traits import Trait, load_spectrum, load_trait
from persona_lens.vectors import PersonaVector, VectorMismatchError, load_vector

Experiment = Literal["spectrum", "manyshot"]
EXPERIMENTS = ("spectrum", "manyshot")
MANYSHOT_COUNTS = (0, 5, 10, 15, 20)
MIN_POINTS = 5  # fewer points give a bootstrap CI that means nothing
TRAIT_CUTOFF = 50.0  # "the response shows the trait" for the classifier view
MAX_FPR = 0.05


class MonitoringError(ValueError):
    """Monitoring cannot give a meaningful answer; the message says what to change."""


# --------------------------------------------------------------------------------------
# The direction and the layer.


def direction(
    model, vector: PersonaVector | Tensor, layer: int, pooling: str = "response_avg"
) -> Float[Tensor, " d_model"]:
    """The unit vector at ``layer`` after checking that ``vector`` fits ``model``.

    ``vector``: a PersonaVector (checked with ``check_model``), a raw ``[n_layers + 1,
    d_model]`` tensor, or one ``[d_model]`` direction. Raises VectorMismatchError."""
    n, d = model.cfg.n_layers, model.cfg.d_model
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= n:
        raise VectorMismatchError(
            f"layer {layer!r} is out of range for {model.cfg.model_name}: it has layers 0..{n} "
            "(0 = embedding output, L = output of block L-1, HF hidden_states[L])."
        )
    if isinstance(vector, PersonaVector):
        vector.check_model(model)
        return vector.unit(layer, pooling)
    if not isinstance(vector, Tensor):
        raise TypeError(f"vector must be a PersonaVector or a tensor, got {type(vector)}.")
    v = vector.detach().float().cpu()
    if v.ndim == 2 and tuple(v.shape) == (n + 1, d):
        v = v[layer]
    if v.ndim != 1 or v.shape[0] != d:
        raise VectorMismatchError(
            f"vector shape {tuple(vector.shape)} does not fit {model.cfg.model_name} (needs "
            f"[{n + 1}, {d}] or [{d}]). Fix: extract a vector for this model."
        )
    if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
        raise VectorMismatchError(f"the vector at layer {layer} is zero or not finite.")
    return ops.unit(v.double()).float()


def _at_layer(model, act: Tensor, layer: int) -> Tensor:
    # HF's hidden_states[n] (and so every recorded vector) is after the final norm.
    return model.ln_final(act) if layer == model.cfg.n_layers else act


# --------------------------------------------------------------------------------------
# Projections of given conversations: one teacher-forced pass per batch.


@dataclass
class Projections:
    """``x . v_hat`` at one layer for every token of each conversation (prompt + response)."""

    layer: int
    tokens: list[Float[Tensor, " seq"]]
    n_prompt: list[int]

    @property
    def prompt_last(self) -> Float[Tensor, " n"]:
        """The last prompt token: the paper's monitor, known before any token is generated."""
        return torch.stack([t[n - 1] for t, n in zip(self.tokens, self.n_prompt, strict=True)])

    @property
    def response_avg(self) -> Float[Tensor, " n"]:
        """Mean over response tokens; NaN for a conversation without a response."""
        return torch.stack(
            [
                t[n:].mean() if len(t) > n else torch.tensor(float("nan"))
                for t, n in zip(self.tokens, self.n_prompt, strict=True)
            ]
        )

    def response_tokens(self, i: int) -> Float[Tensor, " response"]:
        return self.tokens[i][self.n_prompt[i] :]


@torch.no_grad()
def project(
    model,
    convs: Sequence[ChatPrompt],
    vector: PersonaVector | Tensor,
    layer: int,
    pooling: str = "response_avg",
    batch_size: int = 8,
    progress: bool = False,
) -> Projections:
    """Per-token projections from one batched ``run_with_cache`` pass (right-padded: attention
    is causal, so every row gives what it would give alone), in input order, float32."""
    if not convs:
        raise MonitoringError("no conversations to project.")
    v_hat = direction(model, vector, layer, pooling)
    name = hook_name(layer, model.cfg.n_layers)
    device = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id
    out: list[Tensor | None] = [None] * len(convs)
    order = sorted(range(len(convs)), key=lambda i: len(convs[i].ids))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(chunks, desc="project", disable=not progress, unit="batch"):
        width = max(len(convs[i].ids) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, : len(convs[i].ids)] = torch.tensor(convs[i].ids)
        # Stop after the block that writes the layer: later blocks are wasted work here.
        _, cache = model.run_with_cache(
            ids.to(device), names_filter=lambda h: h == name, stop_at_layer=max(layer, 1)
        )
        act = _at_layer(model, cache[name], layer).float()
        proj = (act @ v_hat.to(device)).cpu()
        del cache
        for j, i in enumerate(idx):
            out[i] = proj[j, : len(convs[i].ids)].clone()
    return Projections(layer, out, [c.n_prompt for c in convs])


def project_last_token(
    model,
    question: str,
    vector: PersonaVector | Tensor,
    layer: int,
    system: str | None = None,
    pooling: str = "response_avg",
) -> float:
    """The paper's monitor for one prompt: the last prompt token's projection on v_hat."""
    conv = format_chat(model.tokenizer, question, system=system)
    return float(project(model, [conv], vector, layer, pooling).prompt_last[0])


# --------------------------------------------------------------------------------------
# Monitoring during generation: the same forward passes that generate the text.


class ProjectionRecorder:
    """A read-only hook that records ``x . v_hat`` of every forward pass of one generation
    call: the prefill (``[batch, prompt]``) and one ``[batch]`` column per decode step."""

    def __init__(self, model, v_hat: Tensor, layer: int, info: PassInfo | None = None):
        self.model, self.layer, self.info = model, layer, info
        self.v_hat = v_hat.float()
        self._cast: dict = {}
        self.reset()

    def reset(self) -> None:
        self.prefill: Tensor | None = None
        self.steps: list[Tensor] = []

    def _v(self, like: Tensor) -> Tensor:
        key = like.device
        if key not in self._cast:
            self._cast[key] = self.v_hat.to(like.device)
        return self._cast[key]

    def __call__(self, x: Float[Tensor, "batch pos d_model"], hook=None) -> None:
        info = self.info
        prefill = info.prefill if info is not None and info.prefill is not None else None
        if prefill is None:  # no tracker: the first pass of a call is the prefill
            prefill = self.prefill is None
        # Projections stay on the device; nothing here waits for the GPU.
        p = _at_layer(self.model, x, self.layer).float() @ self._v(x)
        if prefill:
            if self.prefill is not None:
                raise MonitoringError(
                    "two prefill passes in one generation call: the monitor needs one "
                    "generate call per batch (this is a bug in the caller)."
                )
            self.prefill = p.detach()
        else:
            self.steps.append(p[:, -1].detach())

    def rows(
        self, prompt_lens: Sequence[int], response_lens: Sequence[int]
    ) -> list[tuple[list[float], list[float]]]:
        """(prompt-token projections, response-token projections) per row; a response token
        that no forward pass saw (the last one, at max_new_tokens) is NaN."""
        if self.prefill is None:
            raise MonitoringError("the monitor hook never fired: is the layer's hook live?")
        pre = self.prefill.cpu()
        steps = torch.stack(self.steps, 1).cpu() if self.steps else torch.zeros(len(pre), 0)
        if pre.shape[0] != len(prompt_lens):
            raise MonitoringError(
                f"the prefill pass had {pre.shape[0]} rows for {len(prompt_lens)} prompts."
            )
        out = []
        for i, (n_p, n_r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
            resp = steps[i, :n_r].tolist()
            resp += [float("nan")] * (n_r - len(resp))
            out.append((pre[i, pre.shape[1] - n_p :].tolist(), resp))  # left-padded prompt
        return out


@dataclass
class MonitoredGeneration:
    """A response with the projections recorded while it was generated."""

    prompt: ChatPrompt
    response: str
    response_ids: list[int]
    prompt_last: float  # last prompt token, from the prefill pass that started generation
    prompt_tokens: list[float]  # every prompt token, same pass
    response_tokens: list[float]  # one per generated token (NaN: never fed back, see module doc)

    @property
    def response_avg(self) -> float:
        """Mean over the generated tokens the decode passes saw (NaN if none)."""
        vals = [v for v in self.response_tokens if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")


@torch.no_grad()
def generate_monitored(
    model,
    prompts: Sequence[ChatPrompt],
    vector: PersonaVector | Tensor,
    layer: int,
    params: SamplingParams | None = None,
    pooling: str = "response_avg",
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[MonitoredGeneration]:
    """Generate a response for each prompt and record projections from the same passes.

    Prompts are generated in length-sorted batches (one ``generate_ids`` call each, so the
    hook knows which rows it sees); batch ``b`` samples with seed ``params.seed + 100003 b``,
    so a single batch samples exactly like ``generate_ids(model, ids, params)``."""
    params = params or SamplingParams()
    v_hat = direction(model, vector, layer, pooling)
    name = hook_name(layer, model.cfg.n_layers)
    tok = model.tokenizer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].prompt_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    results: dict[int, MonitoredGeneration] = {}
    desc = progress if isinstance(progress, str) else "generate (monitored)"
    with ExitStack() as stack:
        info = stack.enter_context(track_passes(model))
        rec = ProjectionRecorder(model, v_hat, layer, info)
        stack.enter_context(model.hooks(fwd_hooks=[(name, rec)]))
        for b, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
            rec.reset()
            ids = [prompts[i].prompt_ids for i in batch]  # sorted: generate_ids keeps the order
            p_b = dataclasses.replace(params, seed=params.seed + 100_003 * b)
            new = generate_ids(model, ids, p_b, batch_size=len(batch))
            recs = rec.rows([len(x) for x in ids], [len(x) for x in new])
            for i, new_ids, (pt, rt) in zip(batch, new, recs, strict=True):
                results[i] = MonitoredGeneration(
                    prompts[i],
                    tok.decode(new_ids, skip_special_tokens=True),
                    new_ids,
                    pt[-1],
                    pt,
                    rt,
                )
    return [results[i] for i in range(len(prompts))]


# --------------------------------------------------------------------------------------
# Statistics: correlation with bootstrap CIs, the classifier view.


@dataclass
class Correlation:
    """Pearson r between projection and trait score, its p-value and a bootstrap 95% CI."""

    n: int
    r: float
    p: float
    ci_low: float
    ci_high: float

    def __str__(self) -> str:
        ci = f"[{self.ci_low:.3f}, {self.ci_high:.3f}]"
        return f"r = {self.r:.3f} {ci}, p = {self.p:.2g}, n = {self.n}"


def correlation(
    x, y, what: str = "projection vs trait score", n_boot: int = 1000, seed: int = 0
) -> Correlation:
    """Pearson r, p and a percentile-bootstrap 95% CI; MonitoringError instead of a NaN."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise MonitoringError(f"{what}: {len(x)} projections but {len(y)} scores.")
    if len(x) < MIN_POINTS:
        raise MonitoringError(
            f"{what}: {len(x)} scored point(s), too few for a correlation with a confidence "
            f"interval (need at least {MIN_POINTS}). Fix: raise --n-samples or the number of "
            "questions."
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise MonitoringError(f"{what}: the projections or scores contain NaN/inf.")
    for arr, label in ((x, "projections"), (y, "trait scores")):
        if np.ptp(arr) == 0:
            raise MonitoringError(
                f"{what}: every one of the {len(arr)} {label} is {arr[0]:g}, so r is undefined."
            )
    r, p = ops.pearson(x, y)
    lo, hi = ops.bootstrap_ci(lambda a, b: ops.pearson(a, b)[0], x, y, n_boot=n_boot, seed=seed)
    return Correlation(len(x), r, p, lo, hi)


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for the rule ``score >= threshold``, thresholds decreasing,
    starting at (0, 0) with threshold +inf (sklearn's ``roc_curve`` without dropping points)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise MonitoringError("a ROC curve needs both positive and negative examples.")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return (
        np.r_[0.0, fp / n_neg],
        np.r_[0.0, tp / n_pos],
        np.r_[np.inf, s[last]],
    )


def tpr_at_fpr(scores, labels, max_fpr: float = MAX_FPR) -> float:
    """The highest TPR of any threshold whose FPR is at most ``max_fpr``."""
    fpr, tpr, _ = roc_points(scores, labels)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def choose_threshold(scores, labels, max_fpr: float | None = None) -> float:
    """A threshold for ``score >= t``: the one with the best Youden J (TPR - FPR), or, with
    ``max_fpr``, the one with the highest TPR whose FPR is at most ``max_fpr``."""
    fpr, tpr, thr = roc_points(scores, labels)
    if max_fpr is None:
        k = int(np.argmax(tpr - fpr))
    else:
        ok = np.nonzero(fpr <= max_fpr + 1e-12)[0]
        k = int(ok[np.argmax(tpr[ok])])
    return float(thr[k])


def _rates(scores, labels, threshold: float) -> tuple[float, float, float]:
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pred = s >= threshold
    tpr = float((pred & y).sum() / max(1, y.sum()))
    fpr = float((pred & ~y).sum() / max(1, (~y).sum()))
    return tpr, fpr, float((pred == y).mean())


def _split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified half/half split: (calibration indices, test indices)."""
    rng = np.random.default_rng(seed)
    calib, test = [], []
    for cls in (True, False):
        idx = rng.permutation(np.nonzero(labels == cls)[0])
        half = (len(idx) + 1) // 2
        calib.extend(idx[:half])
        test.extend(idx[half:])
    return np.sort(calib), np.sort(test)


@dataclass
class ClassifierResult:
    """The projection as a classifier for "the response will score >= cutoff".

    AUROC (with a bootstrap CI) and ``tpr_at_5fpr_roc`` use every point; the thresholds are
    chosen on a stratified calibration half and evaluated on the held-out test half."""

    cutoff: float
    n: int
    n_pos: int
    n_neg: int
    auroc: float
    auroc_ci: tuple[float, float]
    tpr_at_5fpr_roc: float  # best TPR at FPR <= 5% on the ROC of all points
    n_calib: int
    n_test: int
    test_auroc: float | None  # None when the test half lacks a class
    threshold: float  # best Youden J on the calibration half
    test_accuracy: float
    test_tpr: float
    test_fpr: float
    threshold_5fpr: float  # FPR <= 5% on the calibration half
    test_tpr_at_5fpr: float
    test_fpr_at_5fpr: float


def classify(
    projections,
    scores,
    cutoff: float = TRAIT_CUTOFF,
    max_fpr: float = MAX_FPR,
    seed: int = 0,
    n_boot: int = 1000,
) -> ClassifierResult:
    """AUROC of the projection for ``score >= cutoff``, thresholds chosen on held-out data."""
    x = np.asarray(projections, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64) >= cutoff
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos < 2 or n_neg < 2:
        raise MonitoringError(
            f"the classifier view needs at least 2 responses scoring >= {cutoff:g} and 2 below "
            f"(one of each for the calibration and the test half); got {n_pos} and {n_neg}."
        )
    auroc = ops.auroc(x, y)
    ci = ops.bootstrap_ci(ops.auroc, x, y, n_boot=n_boot, seed=seed)
    calib, test = _split(y, seed)
    thr = choose_threshold(x[calib], y[calib])
    thr5 = choose_threshold(x[calib], y[calib], max_fpr)
    tpr, fpr, acc = _rates(x[test], y[test], thr)
    tpr5, fpr5, _ = _rates(x[test], y[test], thr5)
    both = y[test].any() and (~y[test]).any()
    return ClassifierResult(
        cutoff=cutoff,
        n=len(x),
        n_pos=n_pos,
        n_neg=n_neg,
        auroc=auroc,
        auroc_ci=ci,
        tpr_at_5fpr_roc=tpr_at_fpr(x, y, max_fpr),
        n_calib=len(calib),
        n_test=len(test),
        test_auroc=ops.auroc(x[test], y[test]) if both else None,
        threshold=thr,
        test_accuracy=acc,
        test_tpr=tpr,
        test_fpr=fpr,
        threshold_5fpr=thr5,
        test_tpr_at_5fpr=tpr5,
        test_fpr_at_5fpr=fpr5,
    )


@dataclass
class ConditionSummary:
    label: str
    n: int  # responses
    n_scored: int  # with a trait score
    mean_projection: float
    projection_ci: tuple[float | None, float | None]
    mean_trait: float | None
    trait_ci: tuple[float | None, float | None]
    correlation: Correlation | None  # within this condition
    note: str | None = None  # why there is no within-condition r


@dataclass
class MonitorSummary:
    """What ``summary.json`` holds."""

    n_rows: int
    n_scored: int
    n_missing_scores: int
    overall: Correlation
    conditions: list[ConditionSummary]
    within_pooled: Correlation | None  # r after subtracting each condition's means
    between_means: Correlation | None  # r over the condition means
    # r over prompts (condition x question) with several samples: the projection is one number
    # per prompt, so this compares it with the prompt's expected score. None with one sample.
    prompt_means: Correlation | None
    classifier: ClassifierResult | None
    notes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return _clean(dataclasses.asdict(self))


def _clean(x):
    """JSON-safe: NaN/inf become None, tuples lists."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def _mean_ci(vals) -> tuple[float, tuple[float | None, float | None]]:
    m, lo, hi = ops.mean_ci(vals)
    return m, (lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None)


def summarize(
    rows: Sequence[dict],
    conditions: Sequence[str] | None = None,
    cutoff: float = TRAIT_CUTOFF,
    n_boot: int = 1000,
    seed: int = 0,
    meta: dict | None = None,
) -> MonitorSummary:
    """Correlations overall, within each condition and between condition means, and the
    classifier view, from rows with ``condition``, ``projection`` and ``trait_score``.

    ``conditions``: the labels that must be present, in order (default: as they appear)."""
    labels = (
        list(conditions)
        if conditions is not None
        else list(dict.fromkeys(r["condition"] for r in rows))
    )
    if not labels:
        raise MonitoringError("no rows to summarize: the experiment produced no responses.")
    by_cond = {c: [r for r in rows if r["condition"] == c] for c in labels}
    for c, rs in by_cond.items():
        if not any(r.get("response") for r in rs):
            raise MonitoringError(
                f"condition {c!r} has no responses ({len(rs)} rows, all empty): its r and "
                "means cannot be computed. Fix: check that generation ran for it (raise "
                "--max-new-tokens, or rerun to resume), or drop the condition."
            )
    rows = [r for c in labels for r in by_cond[c]]
    scored = [r for r in rows if r.get("trait_score") is not None]
    if not scored:
        raise MonitoringError(
            f"the judge failed: all {len(rows)} trait scores are missing (no response got a "
            "score), so no correlation is reported. Fix: check the judge (its model, API key or "
            "cache) and rerun; finished generations are kept and only judging is redone."
        )
    x = np.array([r["projection"] for r in scored], dtype=np.float64)
    y = np.array([r["trait_score"] for r in scored], dtype=np.float64)
    overall = correlation(x, y, "overall", n_boot, seed)
    notes = []
    if len(scored) < len(rows):
        notes.append(f"{len(rows) - len(scored)} of {len(rows)} responses have no trait score.")

    cond_out, cx, cy, means = [], [], [], []
    for c in labels:
        rs = by_cond[c]
        sc = [r for r in rs if r.get("trait_score") is not None]
        m_proj, proj_ci = _mean_ci([r["projection"] for r in rs])
        m_trait, trait_ci = _mean_ci([r["trait_score"] for r in sc]) if sc else (None, (None, None))
        corr, note = None, None
        try:
            corr = correlation(
                [r["projection"] for r in sc], [r["trait_score"] for r in sc], f"condition {c!r}",
                n_boot, seed,
            )  # fmt: skip
        except MonitoringError as e:
            note = str(e)
        cond_out.append(
            ConditionSummary(c, len(rs), len(sc), m_proj, proj_ci, m_trait, trait_ci, corr, note)
        )
        if sc:
            px = np.array([r["projection"] for r in sc])
            py = np.array([r["trait_score"] for r in sc])
            cx.append(px - px.mean())
            cy.append(py - py.mean())
            means.append((px.mean(), py.mean()))

    def optional(fn, what):
        try:
            return fn()
        except MonitoringError as e:
            notes.append(f"{what}: {e}")
            return None

    within = optional(
        lambda: correlation(np.concatenate(cx), np.concatenate(cy), "within", n_boot, seed),
        "pooled within-condition r",
    )
    between = optional(
        lambda: correlation(*zip(*means, strict=True), "between condition means", n_boot, seed),
        "r between condition means",
    )
    prompts: dict[tuple, list[dict]] = {}
    for r in scored:
        prompts.setdefault((r["condition"], r.get("question")), []).append(r)
    per_prompt = None
    if any(len(v) > 1 for v in prompts.values()):
        px = [float(np.mean([r["projection"] for r in v])) for v in prompts.values()]
        py = [float(np.mean([r["trait_score"] for r in v])) for v in prompts.values()]
        per_prompt = optional(
            lambda: correlation(px, py, "prompt means", n_boot, seed), "r over prompt means"
        )
    clf = optional(lambda: classify(x, y, cutoff, MAX_FPR, seed, n_boot), "classifier view")
    return MonitorSummary(
        n_rows=len(rows),
        n_scored=len(scored),
        n_missing_scores=len(rows) - len(scored),
        overall=overall,
        conditions=cond_out,
        within_pooled=within,
        between_means=between,
        prompt_means=per_prompt,
        classifier=clf,
        notes=notes,
        meta=dict(meta or {}),
    )


# --------------------------------------------------------------------------------------
# The two experiments' conditions.


@dataclass(frozen=True)
class Condition:
    """One prompt type: a system prompt (None: the template's default) and example turns."""

    label: str
    system: str | None = None
    shots: tuple[tuple[str, str], ...] = ()


def spectrum_conditions(trait: Trait | str) -> list[Condition]:
    """The trait's 8 shipped system prompts, most trait-encouraging first."""
    name = trait.name if isinstance(trait, Trait) else trait
    return [Condition(label, system) for label, system in load_spectrum(name)]


def manyshot_conditions(
    examples: Sequence[tuple[str, str]], counts: Sequence[int] = MANYSHOT_COUNTS
) -> list[Condition]:
    """The first ``k`` example (question, answer) turns for each ``k`` (nested, so conditions
    differ only in how many trait-showing turns come before the question)."""
    if not counts:
        raise MonitoringError("no many-shot counts given.")
    if max(counts) > len(examples):
        raise MonitoringError(
            f"{max(counts)} example turns requested but only {len(examples)} are available. "
            "Fix: lower the shot counts, or give an extraction run with more pos responses."
        )
    return [Condition(f"{k} shots", None, tuple(examples[:k])) for k in counts]


def manyshot_examples(
    trait: Trait,
    n: int,
    source: str | Path | None = None,
    model=None,
    params: SamplingParams | None = None,
) -> list[tuple[str, str]]:
    """``n`` (question, answer) turns that show the trait, from the trait's own artifacts.

    From ``source`` (an extraction run folder or its ``responses.jsonl``): its pos-side
    responses, kept pairs first, then by trait score. Otherwise (or to fill up) ``model``
    answers the trait's extraction questions under its pos system prompts."""
    out: list[tuple[str, str]] = []
    if source is not None:
        path = Path(source)
        path = path / "responses.jsonl" if path.is_dir() else path
        if path.exists():
            rows = [r for r in read_jsonl(path) if r.get("side") == "pos" and r.get("response")]
            rows.sort(key=lambda r: (not r.get("kept"), -(r.get("trait_score") or 0.0)))
            out = [(r["question"], r["response"].strip()) for r in rows][:n]
    if len(out) < n and model is not None:
        params = params or SamplingParams(max_new_tokens=64, seed=12345)
        tok = model.tokenizer
        qs = trait.extract_questions
        need = range(len(out), n)
        prompts = [
            format_chat(
                tok, qs[k % len(qs)], system=trait.system_prompt("pos", k % len(trait.pairs))
            )
            for k in need
        ]
        new = generate_ids(model, [p.prompt_ids for p in prompts], params, batch_size=16)
        out += [
            (qs[k % len(qs)], tok.decode(ids, skip_special_tokens=True).strip())
            for k, ids in zip(need, new, strict=True)
        ]
    if len(out) < n:
        raise MonitoringError(
            f"only {len(out)} trait-showing example turns for many-shot (need {n}). Fix: pass "
            "the extraction run folder (its pos responses are the examples) or a model."
        )
    return out


# --------------------------------------------------------------------------------------
# The experiment runner: generate (monitored), judge, summarize, draw; resumable.


def read_rows(path: str | Path) -> dict[str, dict]:
    """Rows of a ``projections.jsonl`` by key; a later line for a key updates the earlier one
    (score lines are appended after generation lines while a run is in progress)."""
    rows: dict[str, dict] = {}
    for r in read_jsonl(Path(path)):
        if "key" in r:
            rows.setdefault(r["key"], {}).update(r)
    return rows


def _append(path: Path, rows: Sequence[dict]) -> None:
    append_jsonl(path, (_clean(r) for r in rows))


def plan(conditions: Sequence[Condition], questions: Sequence[str], n_samples: int) -> list[dict]:
    """Every (condition, question, sample), in a fixed order."""
    return [
        dict(
            key=f"{ci}|{qi}|{s}",
            condition=c.label,
            condition_index=ci,
            question_index=qi,
            sample=s,
            question=q,
            system_prompt=c.system,
            n_shots=len(c.shots),
        )
        for ci, c in enumerate(conditions)
        for qi, q in enumerate(questions)
        for s in range(n_samples)
    ]


@dataclass
class MonitorRun:
    """The result of :func:`run_monitor`: the summary, every row, and the files written."""

    summary: MonitorSummary
    rows: list[dict]
    out_dir: Path
    files: dict[str, Path]


def _vector_hash(v: Tensor) -> str:
    return hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16]


def _check_run_folder(out: Path, settings: dict, force: bool) -> None:
    """Refuse to mix runs: an existing folder must hold a run with the same settings."""
    run_file = out / "run.json"
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if old != settings:
            if not force:
                diff = sorted(k for k in settings if old.get(k) != settings[k])
                raise MonitoringError(
                    f"{out} holds a monitoring run with other settings ({', '.join(diff)} "
                    "differ). Fix: choose another --out, or pass force=True (--force) to start "
                    "it afresh."
                )
            for name in ("projections.jsonl", "summary.json"):
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2) + "\n")


def run_monitor(
    model,
    vector: PersonaVector | str | Path,
    trait: Trait | str | None,
    layer: int,
    experiment: Experiment = "spectrum",
    out_dir: str | Path | None = None,
    judge=None,
    *,
    n_samples: int = 1,
    n_questions: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    pooling: str = "response_avg",
    shot_counts: Sequence[int] = MANYSHOT_COUNTS,
    shots_source: str | Path | None = None,
    conditions: Sequence[Condition] | None = None,
    n_boot: int = 1000,
    force: bool = False,
    progress: bool = True,
) -> MonitorRun:
    """Run a monitoring experiment and write ``projections.jsonl``, ``summary.json``,
    ``monitor.png``/``.pdf``, ``tokens.html`` and ``tokens.png``/``.pdf`` into ``out_dir``.

    ``vector``: a PersonaVector or an extraction run folder (whose pos responses are also the
    many-shot examples). ``trait``: None takes the vector's own. ``experiment``: ``spectrum``
    (the trait's 8 system prompts) or ``manyshot`` (``shot_counts`` example turns);
    ``conditions`` overrides both. A killed run resumes: finished rows are never generated
    again, and the judge's cache answers the rest.
    """
    from persona_lens import plots_monitoring as pm

    if experiment not in EXPERIMENTS:
        raise MonitoringError(f"experiment must be one of {EXPERIMENTS}, got {experiment!r}.")
    vec_dir = None
    if not isinstance(vector, PersonaVector):
        vec_dir = Path(vector)
        vector = load_vector(vec_dir)
    elif vector.meta.get("record", {}).get("out"):
        vec_dir = Path(vector.meta["record"]["out"])
    if trait is None:
        if not vector.trait:
            raise MonitoringError("the vector does not say its trait: pass the trait's name.")
        trait = vector.trait
    trait = load_trait(trait) if isinstance(trait, str) else trait
    v_hat = direction(model, vector, layer, pooling)  # every mismatch fails here, before work
    if vector.trait and vector.trait != trait.name:
        warnings.warn(
            f"the vector is for trait {vector.trait!r} but the experiment is {trait.name!r}.",
            stacklevel=2,
        )
    if n_samples < 1:
        raise MonitoringError("n_samples must be at least 1.")
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"monitor-{trait.name}"
    params = SamplingParams(max_new_tokens, temperature, top_p, True, seed)

    if conditions is None:
        if experiment == "spectrum":
            conditions = spectrum_conditions(trait)
        else:
            src = shots_source if shots_source is not None else vec_dir
            ex = manyshot_examples(trait, max(shot_counts), src, model)
            conditions = manyshot_conditions(ex, shot_counts)
    conditions = list(conditions)
    questions = trait.eval_questions[:n_questions] if n_questions else trait.eval_questions
    todo_plan = plan(conditions, questions, n_samples)

    judge_obj = judge
    if judge_obj is None:
        from persona_lens.judges import make_judge
        from persona_lens.models import SMOLLM2_ID, hf_model_of

        kw = {}
        if model_info(model).model_id == SMOLLM2_ID and hf_model_of(model) is not None:
            kw["model"] = (hf_model_of(model), model.tokenizer)  # its LM is SmolLM2: share it
        judge_obj = make_judge("offline", cache_path=out / "judgments.sqlite", **kw)
    settings = dict(
        model_id=model_info(model).model_id,
        trait=trait.name,
        trait_hash=trait.hash,
        experiment=experiment,
        layer=layer,
        pooling=pooling,
        vector_hash=_vector_hash(v_hat),
        generation=dataclasses.asdict(params),
        n_samples=n_samples,
        questions=hashlib.sha256("\n".join(questions).encode()).hexdigest()[:16],
        conditions=hashlib.sha256(
            json.dumps([dataclasses.asdict(c) for c in conditions]).encode()
        ).hexdigest()[:16],
    )
    _check_run_folder(out, settings, force)
    path = out / "projections.jsonl"
    done = read_rows(path)
    tok = model.tokenizer

    # 1. Generate what is missing, with the monitor on; rows are appended batch by batch.
    todo = [r for r in todo_plan if "projection" not in done.get(r["key"], {})]
    place = {r["key"]: i for i, r in enumerate(todo_plan)}
    by_label = {c.label: c for c in conditions}
    chunk = batch_size * 2
    bar = tqdm(total=len(todo), desc=f"monitor {trait.name} {experiment}", disable=not progress)
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        prompts = [
            format_chat(
                tok, r["question"], system=r["system_prompt"], shots=by_label[r["condition"]].shots
            )
            for r in rows
        ]
        # Seeded by the first row's place in the plan, so a resumed run samples alike.
        p_chunk = dataclasses.replace(params, seed=seed * 1_000_003 + place[rows[0]["key"]])
        gens = generate_monitored(model, prompts, vector, layer, p_chunk, pooling, batch_size)
        for r, g in zip(rows, gens, strict=True):
            r.update(
                projection=g.prompt_last,
                response_projection=g.response_avg,
                response=g.response,
                response_ids=g.response_ids,
                token_projections=g.response_tokens,
                n_prompt_tokens=len(g.prompt.prompt_ids),
                trait_score=None,
                coherence_score=None,
                judged=False,
            )
            done[r["key"]] = r
        _append(path, rows)
        bar.update(len(rows))
    bar.close()

    # 2. Judge what is not judged yet (by this judge: a new judge re-judges every row).
    rows = [done[p["key"]] for p in todo_plan]
    judge_name = getattr(judge_obj, "name", type(judge_obj).__name__)
    # A missing score is asked again (the judge's cache makes that free): a judge that
    # failed last time gets another chance without generating anything again.
    unjudged = [
        r
        for r in rows
        if not r.get("judged") or r.get("judge") != judge_name or r.get("trait_score") is None
    ]
    for start in range(0, len(unjudged), 64):
        part = unjudged[start : start + 64]
        scores = judge_obj.score(
            trait, [r["question"] for r in part], [r["response"] for r in part], progress=progress
        )
        updates = []
        for r, s in zip(part, scores, strict=True):
            r.update(
                trait_score=s.trait, coherence_score=s.coherence, judged=True, judge=judge_name
            )
            updates.append(
                {k: r[k] for k in ("key", "trait_score", "coherence_score", "judged", "judge")}
            )
        _append(path, updates)
    # One row per response from now on.
    write_atomic(path, "".join(json.dumps(_clean(r)) + "\n" for r in rows))

    # 3. Statistics and figures.
    meta = dict(settings, judge=judge_name, n_questions=len(questions), layer_convention=(
        "layer L = HF hidden_states[L]; projection = last prompt token . unit vector"))  # fmt: skip
    summary = summarize(rows, [c.label for c in conditions], n_boot=n_boot, seed=seed, meta=meta)
    files = {"projections": path, "summary": out / "summary.json"}
    write_atomic(files["summary"], json.dumps(summary.to_json(), indent=2) + "\n")
    title = f"{trait.name}, {experiment}, layer {layer}"
    png, pdf = pm.plot_monitor(rows, summary, out / "monitor", title=title)
    files.update(monitor_png=png, monitor_pdf=pdf)
    examples = token_examples(rows, tok, [c.label for c in conditions])
    files["tokens_html"] = pm.write_tokens_html(examples, out / "tokens.html", title=title)
    if examples:
        hi = max(examples, key=lambda e: e.score if e.score is not None else -1.0)
        png, pdf = pm.plot_token_projections(hi.tokens, hi.values, out / "tokens", hi.title)
        files.update(tokens_png=png, tokens_pdf=pdf)
    return MonitorRun(summary, rows, out, files)


# --------------------------------------------------------------------------------------
# Token-level views.


@dataclass
class TokenExample:
    """One response's tokens and per-token projections, with a caption."""

    title: str
    tokens: list[str]
    values: list[float]
    score: float | None = None


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token as the text it adds (decoded one at a time, special tokens kept)."""
    return [tokenizer.decode([i]) for i in ids]


def token_examples(
    rows: Sequence[dict], tokenizer, conditions: Sequence[str] | None = None, per_condition: int = 1
) -> list[TokenExample]:
    """The first response(s) of each condition with their generation-time projections (the
    last token, never fed back at max_new_tokens, has none and is dropped)."""
    conditions = conditions or list(dict.fromkeys(r["condition"] for r in rows))
    out = []
    for c in conditions:
        rs = [r for r in rows if r["condition"] == c and r.get("response_ids")][:per_condition]
        for r in rs:
            vals = [float("nan") if v is None else v for v in r["token_projections"]]
            strs = token_strings(tokenizer, r["response_ids"])
            keep = [k for k, v in enumerate(vals) if not math.isnan(v)]
            score = r.get("trait_score")
            s = "missing" if score is None else f"{score:.0f}"
            out.append(
                TokenExample(
                    f"{c} | Q: {r['question']} | trait score {s} | "
                    f"last-prompt-token projection {r['projection']:.2f}",
                    [strs[k] for k in keep],
                    [vals[k] for k in keep],
                    score,
                )
            )
    return out

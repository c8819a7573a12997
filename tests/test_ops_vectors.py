"""Pure math against numpy/scipy/sklearn, and vector files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import roc_auc_score

from persona_lens import ops
from persona_lens.vectors import PersonaVector, VectorMismatchError, load_vector


def test_mean_difference_projection_ablation():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(50, 4, 8, generator=g) + 1, torch.randn(30, 4, 8, generator=g)
    want = pos.double().numpy().mean(0) - neg.double().numpy().mean(0)
    assert np.allclose(ops.mean_difference(pos, neg).numpy(), want, atol=1e-6)
    v, x = torch.randn(8, generator=g), torch.randn(5, 8, generator=g)
    assert torch.allclose(ops.projection(x, v), x @ v / v.norm(), atol=1e-6)
    assert ops.projection(ops.ablate(x, v), v).abs().max() < 1e-5
    inc = ops.incremental(pos[0])
    assert torch.allclose(inc.cumsum(0), pos[0], atol=1e-5)


def test_correlation_auroc_against_scipy_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.6 * x + rng.normal(size=200)
    r, p = ops.pearson(x, y)
    ref = pearsonr(x, y)
    assert abs(r - ref.statistic) < 1e-12 and abs(p - ref.pvalue) < 1e-9
    labels = y > 0.3
    scores = np.round(x, 1)  # ties
    assert abs(ops.auroc(scores, labels) - roc_auc_score(labels, scores)) < 1e-12
    lo, hi = ops.bootstrap_ci(lambda a, b: ops.pearson(a, b)[0], x, y, n_boot=300)
    assert lo < r < hi
    with pytest.raises(ValueError, match="at least 3"):
        ops.pearson([1, 2], [1, 2])
    with pytest.raises(ValueError, match="both positive and negative"):
        ops.auroc([1, 2], [True, True])


def test_weighted_score_paper_protocol():
    lp = {"80": np.log(0.5), "90": np.log(0.3), "hello": np.log(0.2)}
    assert ops.weighted_score(lp) == pytest.approx((80 * 0.5 + 90 * 0.3) / 0.8)
    assert ops.weighted_score({"50": np.log(0.2), "REF": np.log(0.8)}) is None
    assert ops.weighted_score({"101": 0.0}) is None


def _vec(n_layers=3, d=8, **meta):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(n_layers + 1, d, generator=g)
    return PersonaVector({"response_avg": t, "prompt_last": 2 * t}, meta)


def test_save_load_roundtrip_and_public_pt(tmp_path):
    v = _vec(model_id="m")
    v.save(tmp_path / "run")
    back = load_vector(tmp_path / "run")
    assert torch.equal(back.get("prompt_last"), v.get("prompt_last")) and back.model_id == "m"
    torch.save(v.get("response_avg"), tmp_path / "evil_response_avg_diff.pt")
    pt = load_vector(tmp_path / "evil_response_avg_diff.pt")
    assert torch.equal(pt.get(), v.get())
    assert torch.allclose(v.incremental()[1:], v.get()[1:] - v.get()[:-1])
    assert torch.allclose(v.unit(2).norm(), torch.tensor(1.0))


def test_gguf_control_vector_export(tmp_path):
    import gguf

    v = _vec(n_layers=4, model_id="m")
    path = v.to_gguf(tmp_path / "cv.gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.3"]
    assert np.allclose(tensors["direction.1"], v.get()[2].numpy())


def test_bad_vectors_get_clear_errors(tmp_path):
    v = _vec()
    with pytest.raises(VectorMismatchError, match="0..3"):
        v.at(7)
    with pytest.raises(KeyError, match="prompt_avg"):
        v.get("prompt_avg")
    z = PersonaVector({"response_avg": torch.zeros(4, 8)})
    with pytest.raises(VectorMismatchError, match="zero"):
        z.at(1)
    nan = PersonaVector({"response_avg": torch.full((4, 8), float("nan"))})
    with pytest.raises(VectorMismatchError, match="NaN"):
        nan.at(1)
    with pytest.raises(FileNotFoundError, match="vector.safetensors"):
        load_vector(tmp_path)


def test_vector_from_another_model(smol_bridge):
    with pytest.raises(VectorMismatchError, match="Extract a vector"):
        _vec().check_model(smol_bridge)
    other = PersonaVector({"response_avg": torch.randn(31, 576)}, {"model_id": "other/model"})
    with pytest.warns(UserWarning, match="other/model"):
        other.check_model(smol_bridge)

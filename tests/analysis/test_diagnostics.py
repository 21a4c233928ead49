"""Representation diagnostics: compactness, accuracies, feature and weight norms against direct
computations on small tensors; the weight-norm reader for every kind of classifier; the plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ltlib.analysis.diagnostics import (
    ModelOutputs,
    class_weight_norms,
    diagnose,
    intra_class_compactness,
    model_outputs,
    per_class_accuracy,
    plot_compactness,
    shot_accuracies,
    write_diagnostics_figures,
)
from ltlib.backbones import create_backbone
from ltlib.errors import LtlibError
from ltlib.methods.baselines import BaselineClassifier
from ltlib.methods.bbn import BBN
from ltlib.methods.two_head import TwoHeadModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNTS = [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]


def direct_compactness(features: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """BBN supplementary B, written out: normalise, average per class, mean distance to that average."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        members = features[targets == c]
        if len(members):
            unit = members / np.sqrt((members ** 2).sum(axis=1, keepdims=True))
            centroid = unit.mean(axis=0)
            out[c] = np.mean([math.sqrt(((u - centroid) ** 2).sum()) for u in unit])
    return out


def random_data(seed: int = 0, n: int = 60, d: int = 5, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=generator) + 0.3
    targets = torch.randint(0, c - 1, (n,), generator=generator)  # the last class gets no sample
    return features, targets


def test_compactness_equals_the_direct_computation():
    features, targets = random_data()
    got = intra_class_compactness(features, targets, 4).numpy()
    want = direct_compactness(features.double().numpy(), targets.numpy(), 4)
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-12)
    assert math.isnan(got[3])


def test_compactness_ignores_feature_scale_only_when_normalising():
    features, targets = random_data(1)
    scales = torch.rand(len(features), 1) * 10 + 0.1
    np.testing.assert_allclose(intra_class_compactness(features * scales, targets, 4)[:3],
                               intra_class_compactness(features, targets, 4)[:3], rtol=1e-6)
    raw = intra_class_compactness(features * scales, targets, 4, normalize=False)
    assert not np.allclose(raw[:3], intra_class_compactness(features, targets, 4, normalize=False)[:3])
    # identical directions: a perfectly compact class
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    assert intra_class_compactness(same, torch.zeros(3, dtype=torch.long), 1).item() == pytest.approx(0.0, abs=1e-12)


def test_accuracies_equal_direct_counts():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 1, 0, 1, 1, 0, 2, 1, 2])
    acc = per_class_accuracy(predictions, targets, 4).numpy()
    np.testing.assert_allclose(acc[:3], [2 / 3, 1.0, 2 / 4])
    assert math.isnan(acc[3])
    scores = torch.nn.functional.one_hot(predictions, 4).float()
    np.testing.assert_allclose(per_class_accuracy(scores, targets, 4).numpy()[:3], acc[:3])
    shots = shot_accuracies([0.9, 0.5, 0.4, 0.1, float("nan")], [500, 100, 20, 19, 5])
    # many: > 100; medium: 20..100; few: < 20 (the NaN class is skipped)
    assert shots == {"many": pytest.approx(0.9), "medium": pytest.approx(0.45), "few": pytest.approx(0.1)}
    assert math.isnan(shot_accuracies([0.5], [50])["few"])


def test_diagnose_feature_norms_and_shape_checks():
    features, targets = random_data(2)
    outputs = ModelOutputs(features, targets.clone(), targets)
    run = diagnose(outputs, [30, 20, 10, 5], label="x", weight_norms={"classifier": torch.arange(4.0)})
    for c in range(3):
        assert run.feature_norms[c] == pytest.approx(features[targets == c].norm(dim=1).mean().item(), rel=1e-6)
    assert np.isnan(run.feature_norms[3]) and np.isnan(run.accuracy[3])
    assert run.accuracy[:3].tolist() == [1.0, 1.0, 1.0]
    assert run.summary()["weight_norm_std[classifier]"] == pytest.approx(np.std([0, 1, 2, 3]))
    assert [row["shot"] for row in run.rows()] == ["medium", "medium", "few", "few"]
    with pytest.raises(LtlibError, match="shape"):
        diagnose(outputs, [30, 20, 10, 5], label="x", weight_norms={"classifier": torch.ones(3)})
    with pytest.raises(LtlibError, match="class counts"):
        diagnose(outputs, [30, 20], label="x")


def test_weight_norms_of_a_linear_and_a_cosine_classifier():
    torch.manual_seed(0)
    linear = BaselineClassifier(create_backbone("resnet20", in_chans=1), 10, COUNTS)
    np.testing.assert_allclose(class_weight_norms(linear)["classifier"],
                               np.sqrt((linear.classifier.weight.detach().numpy() ** 2).sum(axis=1)), rtol=1e-6)
    cosine = BaselineClassifier(create_backbone("resnet20", in_chans=1), 10, COUNTS, loss="ldam")
    weight = cosine.classifier.weight.detach().numpy()
    assert weight.shape == (10, 64)
    np.testing.assert_allclose(class_weight_norms(cosine)["classifier"], np.linalg.norm(weight, axis=1), rtol=1e-6)


def test_weight_norms_of_bbn_are_its_inference_classifiers():
    torch.manual_seed(0)
    bbn = BBN(create_backbone("resnet20", in_chans=1), 10, COUNTS)  # official combiner: one fc on [2a f_c, 2(1-a) f_r]
    weight = bbn.classifier.fc.weight.detach().numpy()  # at alpha = 0.5 the factors are 1
    norms = class_weight_norms(bbn)
    np.testing.assert_allclose(norms["BBN-CB (W_c)"], np.linalg.norm(weight[:, :64], axis=1), rtol=1e-6)
    np.testing.assert_allclose(norms["BBN-RB (W_r)"], np.linalg.norm(weight[:, 64:], axis=1), rtol=1e-6)
    np.testing.assert_allclose(norms["BBN-ALL ([W_c, W_r])"], np.linalg.norm(weight, axis=1), rtol=1e-6)


def test_weight_norms_of_the_two_head_model_average_each_class_clusters():
    torch.manual_seed(0)
    model = TwoHeadModel(create_backbone("resnet20", in_chans=1), 10, COUNTS, u=4)
    rows = np.linalg.norm(model.classifier.weight.detach().numpy(), axis=1)
    owner = np.asarray(model.division.cluster_to_class)
    assert len(rows) == model.division.num_clusters > 10
    norms = class_weight_norms(model)
    np.testing.assert_allclose(norms["classifier"], [rows[owner == c].mean() for c in range(10)], rtol=1e-6)
    assert set(norms) == {"classifier", "feature_balancing_head"} and norms["feature_balancing_head"].shape == (10,)


def test_model_outputs_use_evaluate_logits_and_the_classifier_input():
    torch.manual_seed(0)
    bbn = BBN(create_backbone("resnet20", in_chans=1), 10, COUNTS).train()
    images, targets = torch.randn(12, 1, 8, 8), torch.arange(12) % 10
    outputs = model_outputs(bbn, DataLoader(TensorDataset(images, targets), batch_size=5))
    assert bbn.training  # the mode is restored
    bbn.eval()
    with torch.no_grad():
        assert torch.equal(outputs.predictions, bbn.evaluate_logits(images).argmax(1))
        torch.testing.assert_close(outputs.features, bbn.penultimate_features(images))  # [f_c, f_r]
    assert outputs.features.shape == (12, 128) and torch.equal(outputs.targets, targets)


def test_figures_are_written_for_several_runs(tmp_path):
    features, targets = random_data(3, c=4)
    runs = {name: diagnose(ModelOutputs(features * scale, targets, targets), [30, 20, 10, 5], label=name,
                           weight_norms={"classifier": torch.rand(4)}) for name, scale in (("a", 1.0), ("b", 2.0))}
    files = write_diagnostics_figures(runs, tmp_path, {"a": {"top1": 0.5}, "b": {"top1": 0.6}})
    assert [f.name for f in files] == ["compactness.png", "feature_norms.png", "weight_norms.png",
                                       "accuracy_vs_count.png", "shot_accuracy.png"]
    assert all(f.stat().st_size > 1000 for f in files)
    other = diagnose(ModelOutputs(features, targets, targets), [9, 8, 7, 6], label="c")
    with pytest.raises(LtlibError, match="different class counts"):
        plot_compactness({**runs, "c": other})

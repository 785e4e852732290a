"""Review audit: DN2Detector's labels against its float64 threshold, and an EfficientNet-Lite bank saved before the
per-input padding fix loaded with load_state_dict."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import DictDataset, quiet_trainer
from torch.utils.data import DataLoader

from dn2_lightning import DN2Module
from dn2_lightning.detector import DN2Detector

ULP = 2.0**-12  # (1, ULP, ULP) apart: a squared distance of 1 + 2**-23, float32's next value after 1


def pairs_one_ulp_apart() -> np.ndarray:
    """Six pairs of rows far apart: four pairs 0.5 apart, one 1 apart, one sqrt(1 + 2**-23) apart (exact in
    float32), so the leave-one-out scores at k=1 are eight 0.25s, two 1.0s and two 1.0000001s."""
    offsets = [(0.5, 0.0, 0.0)] * 4 + [(1.0, 0.0, 0.0), (1.0, ULP, ULP)]
    rows = []
    for i, offset in enumerate(offsets):
        centre = np.array([100.0 * i, 0.0, 0.0])
        rows += [centre, centre + np.array(offset)]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
def test_detector_labels_and_predict_follow_the_float64_threshold_exactly(as_tensor):
    # the 9.7/11 quantile of the twelve scores lies 0.7 of the way from 1.0 to 1.0000001: rounded to float32 it is
    # 1.0000001, which a float32 comparison then does not flag; DN2Module flags such scores (scoring.exceeds)
    x = pairs_one_ulp_apart()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few scores for the quantile
        detector = DN2Detector(k=1, threshold_quantile=9.7 / 11).fit(torch.from_numpy(x) if as_tensor else x)
    scores, threshold = np.asarray(detector.decision_scores_, dtype=np.float64), detector.threshold_
    expected_threshold = np.quantile(scores, 9.7 / 11)  # NumPy's linear quantile in float64
    assert threshold == pytest.approx(expected_threshold, rel=1e-15) and 1.0 < threshold < float(np.float32(1) + 2**-23)
    expected = (scores > threshold).astype(np.int64)  # decision_scores_ > threshold_, as documented
    assert expected.sum() == 2
    np.testing.assert_array_equal(np.asarray(detector.labels_), expected)
    query = np.array([[299.0, -ULP, -ULP]], dtype=np.float32)  # (1, ULP, ULP) from a bank row: scores 1.0000001
    query = torch.from_numpy(query) if as_tensor else query
    query_scores = np.asarray(detector.decision_function(query), dtype=np.float64)
    assert query_scores[0] == 1.0 + 2**-23
    np.testing.assert_array_equal(np.asarray(detector.predict(query)), (query_scores > threshold).astype(np.int64))


def test_an_old_lite_bank_loaded_with_load_state_dict_is_refused_where_its_padding_differed():
    """A checkpoint saved before the EfficientNet-Lite trunks padded each input for its own size (no lite_padding,
    no fingerprint) is refused at 40 px by load_from_checkpoint; the same state through load_state_dict must be too,
    at its first use (its rows hold the old padding's embeddings)."""
    images = torch.rand(12, 3, 8, 8)
    loader = DataLoader(DictDataset(images, torch.zeros(12, dtype=torch.long)), batch_size=6)
    settings = dict(k=2, backbone="efficientnet_lite0", pretrained=False, input_size=40, reports=False)
    model = DN2Module(**settings)
    quiet_trainer().fit(model, train_dataloaders=loader)
    state = model.state_dict()
    del state["bank._extra_state"]["lite_padding"]  # as an earlier dn2-lightning saved it
    state["bank.fingerprint"] = torch.empty(0, 0)  # nor had it fingerprints
    loaded = DN2Module(**settings)
    loaded.load_state_dict(state)
    refused = r"efficientnet_lite0 at input_size=40 .* Build the bank again with fit"
    with pytest.raises(ValueError, match=refused):
        loaded.score_images(images[:2])
    with pytest.raises(ValueError, match=refused):
        quiet_trainer().predict(loaded, DataLoader(DictDataset(images[:2], torch.zeros(2, dtype=torch.long))))

"""Each evaluation metric against an independent computation on a model whose answer is known.

The region model (tests/evaluate_models.py) scores class k as the sum of the image over region k,
so deletion/insertion curves, confidence changes and the best/worst orderings are computed here by
hand, without onnxcam's code; ROAD's imputation is checked against a dense solve written from the
paper's equations and against functions it must reproduce exactly (constants, linear ramps);
similarities against SciPy and scikit-image.
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluate_models import SIZE, positive_images, region_masks, region_model
from onnxcam.errors import UsageError
from onnxcam.evaluate import confidence, localisation, perturbation, road, similarity
from onnxcam.evaluate.scoring import ScoreModel

MASKS = region_masks()


@pytest.fixture(scope="module")
def scorer():
    return ScoreModel(region_model(MASKS), score="logit", batch_size=7)  # 7: batches cut curves mid-way


def region_first(n):
    """Maps ranking region 0 first (by the pixel's value inside it, constant outside)."""
    return np.repeat(MASKS[0][None] + 0.01, n, axis=0)


def region_last(n):
    return np.repeat(1.0 - MASKS[0][None], n, axis=0)


def random_maps(n, seed=1):
    return np.random.default_rng(seed).random((n, SIZE, SIZE))


def hand_curve(image, cam, steps, insert):
    """Deletion/insertion curve of the region-0 logit with a zero baseline, pixel by pixel."""
    order = np.argsort(-cam.reshape(-1), kind="stable")
    per = -(-cam.size // steps)
    region = MASKS[0].reshape(-1).astype(bool)
    values = image.reshape(-1)
    curve = []
    for k in range(steps + 1):
        changed = np.zeros(cam.size, bool)
        changed[order[:k * per]] = True
        present = changed if insert else ~changed
        curve.append(values[region & present].sum())
    return np.array(curve)


@pytest.mark.parametrize("insert", [False, True])
def test_curve_equals_hand_computation(scorer, insert):
    x = positive_images(3)
    maps = random_maps(3)
    run = perturbation.insertion if insert else perturbation.deletion
    result = run(scorer, x, maps, np.zeros(3, np.int64), steps=16, baseline="zeros")
    expected = np.stack([hand_curve(x[i, 0], maps[i], 16, insert) for i in range(3)])
    assert expected.std() > 1  # a curve that moves
    np.testing.assert_allclose(result.curves, expected, rtol=1e-5)
    trapezoid = (expected[:, 1:] + expected[:, :-1]).sum(axis=1) / 2 / 16
    np.testing.assert_allclose(result.auc, trapezoid, rtol=1e-5)
    assert result.fractions[0] == 0 and result.fractions[-1] == 1


def test_deletion_orders_best_random_worst(scorer):
    x = positive_images(4)
    classes = np.zeros(4, np.int64)
    best = perturbation.deletion(scorer, x, region_first(4), classes, steps=32).auc
    worst = perturbation.deletion(scorer, x, region_last(4), classes, steps=32).auc
    rand = perturbation.deletion(scorer, x, random_maps(4), classes, steps=32).auc
    assert np.all(best < rand) and np.all(rand < worst)
    ins_best = perturbation.insertion(scorer, x, region_first(4), classes, steps=32, baseline="zeros").auc
    ins_worst = perturbation.insertion(scorer, x, region_last(4), classes, steps=32, baseline="zeros").auc
    ins_rand = perturbation.insertion(scorer, x, random_maps(4), classes, steps=32, baseline="zeros").auc
    assert np.all(ins_worst < ins_rand) and np.all(ins_rand < ins_best)


def test_scores_run_in_batches_not_one_by_one(scorer):
    x = positive_images(3)
    before = scorer.forward_passes
    perturbation.deletion(scorer, x, random_maps(3), np.zeros(3, np.int64), steps=20)
    assert scorer.forward_passes - before == 3 * 21  # every curve point once, 7 per run


def test_baselines():
    scorer = ScoreModel(region_model(MASKS), batch_size=4)
    x = positive_images(2)
    mean = perturbation.baseline_images(scorer, x, "mean")
    np.testing.assert_allclose(mean[:, :, 3, 5], x.mean(axis=(2, 3)), rtol=1e-6)
    blur = perturbation.baseline_images(scorer, x, "blur")
    assert blur.shape == x.shape and blur.std() < x.std()
    with pytest.raises(UsageError, match="baseline"):
        perturbation.baseline_images(scorer, x, "noise")


def test_probability_score_is_softmax_of_the_logits():
    x = positive_images(2)
    logits = ScoreModel(region_model(MASKS), score="logit").class_scores(x)
    probs = ScoreModel(region_model(MASKS)).class_scores(x)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-6)


# --------------------------------------------------------------------------------------- ROAD

def dense_imputation(image, keep):
    """The ROAD system written out pixel by pixel and solved densely (the paper's equations)."""
    c, h, w = image.shape
    weights = {(1, 1): 1 / 12, (0, 1): 1 / 6, (-1, 1): 1 / 12, (1, -1): 1 / 12, (0, -1): 1 / 6,
               (-1, -1): 1 / 12, (1, 0): 1 / 6, (-1, 0): 1 / 6}
    unknown = [(r, q) for r in range(h) for q in range(w) if not keep[r, q]]
    index = {p: i for i, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), c))
    for i, (r, q) in enumerate(unknown):
        for (dr, dq), wt in weights.items():
            rr, qq = r + dr, q + dq
            if not (0 <= rr < h and 0 <= qq < w):
                continue
            a[i, i] += wt
            if keep[rr, qq]:
                b[i] += wt * image[:, rr, qq]
            else:
                a[i, index[(rr, qq)]] -= wt
    out = image.astype(np.float64).copy()
    solution = np.linalg.solve(a, b)
    for i, (r, q) in enumerate(unknown):
        out[:, r, q] = solution[i]
    return out


def test_imputation_equals_dense_solve():
    rng = np.random.default_rng(3)
    image = rng.standard_normal((3, 9, 11)).astype(np.float32)
    keep = rng.random((9, 11)) > 0.6
    keep[0, 0] = True
    ours = road.noisy_linear_impute(image, keep, noise=0.0)
    expected = dense_imputation(image, keep)
    assert np.abs(expected[:, ~keep] - image[:, ~keep]).max() > 0.1  # the imputation changed something
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    np.testing.assert_array_equal(ours[:, keep], image[:, keep])


def test_imputation_reproduces_linear_ramps_and_adds_noise():
    r, q = np.mgrid[0:12, 0:12].astype(np.float32)
    image = np.stack([2 * r - q + 1, np.full_like(r, 0.5)])
    keep = np.ones((12, 12), bool)
    keep[3:9, 2:10] = False  # interior hole: the 8-neighbour mean is exact for linear functions
    np.testing.assert_allclose(road.noisy_linear_impute(image, keep, noise=0.0), image, atol=1e-4)
    noisy = road.noisy_linear_impute(image, keep, noise=0.01, rng=np.random.default_rng(0))
    residual = (noisy - image)[:, ~keep]
    assert 0.005 < residual.std() < 0.02 and np.all((noisy - image)[:, keep] == 0)


def test_removal_masks_follow_pytorch_grad_cam():
    cam = np.random.default_rng(0).random((10, 10)).astype(np.float32)
    keep = road.removal_mask(cam, 70, "morf")  # removes the top 30 %
    assert keep.sum() == 70 and cam[~keep].min() >= cam[keep].max()
    keep = road.removal_mask(cam, 70, "lerf")  # removes the bottom 30 %
    assert keep.sum() == 70 and cam[~keep].max() <= cam[keep].min()


def test_road_ranks_the_right_map_first(scorer):
    x = positive_images(2)
    classes = np.zeros(2, np.int64)
    good = [road.road(scorer, x, region_first(2), classes, o, (30, 60, 90), noise=0.0) for o in ("morf", "lerf")]
    bad = [road.road(scorer, x, region_last(2), classes, o, (30, 60, 90), noise=0.0) for o in ("morf", "lerf")]
    assert np.all(good[0].score < bad[0].score)  # MoRF: removing the region first hurts most
    assert np.all(good[1].score > bad[1].score)  # LeRF: removing everything else first hurts least
    assert np.all(road.road_combined(*good) > road.road_combined(*bad))
    # change at 90 %: the imputed region-0 logit minus the original one, by hand
    keep = road.removal_mask(region_first(2)[0], 90, "morf")
    filled = road.noisy_linear_impute(x[0], keep, noise=0.0)
    by_hand = (filled[0] * MASKS[0]).sum() - (x[0, 0] * MASKS[0]).sum()
    assert good[0].changes[0, 2] == pytest.approx(by_hand, rel=1e-5)


# --------------------------------------------------------------------------------- confidence

def test_confidence_change_by_hand(scorer):
    x = positive_images(3)
    maps = np.stack([region_first(1)[0] * 0.5, random_maps(1)[0], np.ones((SIZE, SIZE))])
    result = confidence.confidence_change(scorer, x, maps, np.zeros(3, np.int64))
    y = (x[:, 0] * MASKS[0]).sum(axis=(1, 2))
    o = (x[:, 0] * maps * MASKS[0]).sum(axis=(1, 2))
    np.testing.assert_allclose(result.original, y, rtol=1e-5)
    np.testing.assert_allclose(result.explained, o, rtol=1e-5)
    np.testing.assert_allclose(result.drop, np.maximum(y - o, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.relative_drop, np.maximum(y - o, 0) / y, rtol=1e-4, atol=1e-6)
    assert result.drop[0] > 1 and result.drop[2] == pytest.approx(0, abs=1e-4)
    assert result.average_drop == pytest.approx(100 * np.mean(np.maximum(y - o, 0) / y), rel=1e-4)


# ------------------------------------------------------------------------------- localisation

def test_pointing_and_energy():
    cam = np.zeros((8, 8))
    cam[1, 1], cam[6, 6] = 1.0, 0.5
    region = localisation.box_mask([[0, 0, 3, 3]], (8, 8))
    assert localisation.pointing_game(cam, region)
    assert not localisation.pointing_game(cam, ~region)
    assert localisation.pointing_game(cam, localisation.box_mask([[3, 0, 5, 2]], (8, 8)), tolerance=2.0)
    assert localisation.energy_pointing_game(cam, region) == pytest.approx(1.0 / 1.5)
    assert localisation.top_k_precision(cam, region, 2) == 0.5
    with pytest.raises(UsageError, match="shape"):
        localisation.energy_pointing_game(cam, np.ones((4, 4), bool))


def test_localisation_box_is_the_largest_segment():
    cam = np.zeros((20, 20))
    cam[2:6, 3:12] = 1.0  # large segment
    cam[15:17, 15:17] = 0.9  # small segment
    cam[10, 10] = 0.1  # below 15 % of the max
    assert localisation.largest_segment_box(cam) == (3, 2, 12, 6)
    assert localisation.localisation_iou(cam, [[3, 2, 12, 6]]) == pytest.approx(1.0)
    assert localisation.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert localisation.localisation_iou(np.zeros((5, 5)), [[0, 0, 1, 1]]) == 0.0


def test_boxes_file(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text('{"cat.png": [[1, 2, 30, 40]], "dog": [5, 5, 9, 9]}')
    boxes = localisation.load_boxes(path)
    assert localisation.boxes_for(boxes, "photos/cat.png") == [[1, 2, 30, 40]]
    assert localisation.boxes_for(boxes, "x/dog.jpg") == [[5, 5, 9, 9]]
    path.write_text('{"cat.png": [[10, 2, 3, 40]]}')
    with pytest.raises(UsageError, match="x1 > x0"):
        localisation.load_boxes(path)


# --------------------------------------------------------------------------------- similarity

def test_similarities_match_scipy_and_skimage():
    from scipy.stats import pearsonr, spearmanr
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((20, 24))
    b = 0.6 * a + 0.4 * rng.random((20, 24))
    b[:5] = 0.25  # ties
    assert similarity.spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert similarity.pearson(a, b) == pytest.approx(pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)
    expected = structural_similarity(a, b, data_range=1.0)
    assert 0.1 < expected < 0.95
    assert similarity.ssim(a, b) == pytest.approx(expected, abs=1e-10)
    assert np.isnan(similarity.pearson(a, np.zeros_like(a)))  # an all-zero map has no ranking


@pytest.mark.parametrize("baseline", ["zeros", "blur", "mean"])
def test_nhwc_models_give_the_same_curves(baseline):
    nchw = ScoreModel(region_model(MASKS), score="logit")
    nhwc = ScoreModel(region_model(MASKS, nhwc=True), score="logit")
    assert nhwc.layout == "NHWC" and nhwc.spatial_axes == (1, 2)
    x = positive_images(2)
    maps, classes = random_maps(2), np.zeros(2, np.int64)
    a = perturbation.deletion(nchw, x, maps, classes, steps=8, baseline=baseline)
    b = perturbation.deletion(nhwc, x.transpose(0, 2, 3, 1), maps, classes, steps=8, baseline=baseline)
    np.testing.assert_allclose(a.curves, b.curves, rtol=1e-5)
    assert a.curves.std() > 1
    ra = road.road(nchw, x, maps, classes, "morf", (50,), noise=0.0)
    rb = road.road(nhwc, x.transpose(0, 2, 3, 1), maps, classes, "morf", (50,), noise=0.0)
    np.testing.assert_allclose(ra.changes, rb.changes, rtol=1e-5)

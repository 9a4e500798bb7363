"""Image preprocessing: crops, Mixup / CutMix soft labels, RandAugment, synthetic source."""
import numpy as np
import pytest

from qtransformers.data import default_data_config, make_eval_iterator, make_train_iterator
from qtransformers.data.augment import OPS, _apply, rand_augment
from qtransformers.data.images import (eval_image, mix_pairs, random_crop_box, resize,
                                       soft_labels)


def _cfg(**aug):
    cfg = default_data_config()
    cfg.source, cfg.objective, cfg.image_size, cfg.num_classes = "synthetic", "image", 24, 5
    cfg.synthetic_size, cfg.prefetch = 64, 0
    for k, v in aug.items():
        cfg.augment[k] = v
    return cfg


def test_random_crop_box_statistics():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        top, left, h, w = random_crop_box(60, 80, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80 and h > 0 and w > 0
        areas.append(h * w / 4800)
    assert 0.07 < min(areas) and max(areas) <= 1.0 and 0.35 < np.mean(areas) < 0.6


def test_eval_center_crop_and_normalisation():
    cfg = _cfg()
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 40:] = 255  # right half white
    out = eval_image(image, cfg)
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    # Short side 40 -> 27 (24 / 0.875), width 54; the centre crop straddles the edge.
    assert out[:, 0, 0] == pytest.approx(-0.485 / 0.229, abs=1e-5)
    assert out[:, -1, 0] == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)
    assert resize(image, 40, 80) is image


def test_mixup_and_cutmix_soft_labels():
    aug = _cfg(mixup_alpha=0.8, cutmix_alpha=1.0).augment
    images = np.stack([np.full((8, 8, 3), v, np.float32) for v in (0.0, 1.0, 2.0, 3.0)])
    probs = soft_labels(np.array([0, 1, 2, 3]), 4, smoothing=0.0)
    mixed, mixed_probs = mix_pairs(images, probs, first_index=10, seed=0, aug=aug)
    np.testing.assert_allclose(mixed_probs.sum(1), 1.0, rtol=1e-6)
    for a in (0, 2):  # each pair mixes only within itself, and the pixel mass matches the label
        b = a + 1
        assert mixed_probs[a, [a, b]].sum() == pytest.approx(1.0)
        lam = mixed_probs[a, a]
        frac_b = (mixed[a] - images[a]).mean() / (images[b] - images[a]).mean()
        assert frac_b == pytest.approx(1 - lam, abs=1e-5)
    assert not np.array_equal(mixed, images)
    smooth = soft_labels(np.array([1]), 10, smoothing=0.1)[0]
    assert smooth[1] == pytest.approx(0.91) and smooth[0] == pytest.approx(0.01)


def test_rand_augment_ops_keep_shape():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    from PIL import Image

    for name in OPS:
        out = np.asarray(_apply(name, Image.fromarray(image), 0.9, rng))
        assert out.shape == image.shape and out.dtype == np.uint8, name
    out = rand_augment(image, rng, num_ops=2, magnitude=9)
    assert out.shape == image.shape and not np.array_equal(out, image)


def test_synthetic_pipeline_shards_resume_and_eval():
    cfg = _cfg(mixup_alpha=0.2, cutmix_alpha=1.0, randaugment_num_ops=1, label_smoothing=0.1)
    whole = make_train_iterator(cfg, global_batch_size=8, seed=1)
    batches = [next(whole) for _ in range(2)]
    b = batches[0]
    assert b["image"].shape == (8, 24, 24, 3) and b["label_probs"].shape == (8, 5)
    assert set(b) == {"image", "label", "label_probs", "weights"} and b["weights"].all()
    np.testing.assert_allclose(b["label_probs"].sum(1), 1.0, rtol=1e-5)
    # Pairs never cross processes: two halves equal the single-process batch, Mixup included.
    halves = [next(make_train_iterator(cfg, global_batch_size=8, seed=1, process_index=p,
                                       process_count=2)) for p in range(2)]
    for k in b:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), b[k])
    resumed = make_train_iterator(cfg, global_batch_size=8, seed=1)
    resumed.set_state({"kind": "indexed", "global_batch_size": 8, "seed": 1, "step": 1})
    np.testing.assert_array_equal(next(resumed)["image"], batches[1]["image"])
    ev = list(make_eval_iterator(cfg, batch_size=6))
    assert len(ev) == 3 and ev[-1]["weights"].tolist() == [1, 1, 1, 1, 0, 0]  # 16 images
    labels = np.concatenate([e["label"][e["weights"] > 0] for e in ev])
    assert labels.tolist() == [(64 + i) % 5 for i in range(16)]

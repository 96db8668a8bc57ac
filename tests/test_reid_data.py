"""ReID data: the P x K sampler (incl. DDP sharding), the procedural multi-camera generator, the Market-1501 reader."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from lightning_effnets.data import Market1501DataModule, MultiCameraReIDDataModule, PKSampler
from lightning_effnets.data.reid import BATCH_KEYS, parse_market1501_name
from lightning_effnets.data.reid_synthetic import camera_style, render_identities
from lightning_effnets.metrics import ReIDMetric

# ----------------------------------------------------------------------------- P x K sampler


def _batches(sampler):
    flat = list(sampler)
    assert len(flat) == len(sampler)
    size = sampler.p * sampler.k
    return [flat[i:i + size] for i in range(0, len(flat), size)]


def test_pk_batches_hold_p_identities_with_k_images_each():
    pids = np.repeat(np.arange(10), [4, 8, 5, 4, 12, 4, 6, 4, 4, 1])  # identity 9 has a single image
    sampler = PKSampler(pids, p=4, k=3, seed=1)
    batches = _batches(sampler)
    assert len(batches) == len(pids) // 12
    seen = Counter()
    for batch in batches:
        ids = [pids[i] for i in batch]
        groups = [ids[j:j + 3] for j in range(0, 12, 3)]
        assert all(len(set(g)) == 1 for g in groups)  # K consecutive images of one identity
        assert len({g[0] for g in groups}) == 4  # P distinct identities
        for g_start in range(0, 12, 3):
            chunk = batch[g_start:g_start + 3]
            if pids[chunk[0]] != 9:
                assert len(set(chunk)) == 3  # identities with >= K images never repeat one inside a batch
        seen.update(batch)
    # images of an identity are used evenly: no image twice before all of that identity's images were used
    for identity in range(9):
        counts = [seen[i] for i in np.flatnonzero(pids == identity)]
        assert max(counts) - min(counts) <= 1, identity


def test_pk_sampler_is_deterministic_per_epoch_and_reshuffles():
    pids = np.repeat(np.arange(12), 6)
    a, b = PKSampler(pids, 4, 2, seed=3), PKSampler(pids, 4, 2, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)


def test_pk_sampler_ddp_shards_are_disjoint_complete_and_equal():
    pids = np.repeat(np.arange(15), 5)  # 75 images, 8-image batches: 9 global batches
    reference = PKSampler(pids, p=4, k=2, num_replicas=1, rank=0, seed=7)
    global_batches = [b.tolist() for b in reference.global_batch_indices()]
    assert len(global_batches) == 9
    shards = [_batches(PKSampler(pids, p=4, k=2, num_replicas=2, rank=r, seed=7)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4  # equal counts: no rank waits for another (9 // 2)
    assert shards[0] == global_batches[0:8:2] and shards[1] == global_batches[1:8:2]
    # Lightning only injects its own DistributedSampler when the sampler is not one
    assert isinstance(reference, DistributedSampler)


def test_pk_sampler_errors():
    pids = np.repeat(np.arange(3), 4)
    with pytest.raises(ValueError, match="k >= 2"):
        PKSampler(pids, p=2, k=1)
    with pytest.raises(ValueError, match=r"p <= number of identities \(3\)"):
        PKSampler(pids, p=4, k=2)
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        PKSampler(pids, p=2, k=2, num_replicas=4, rank=0)

# ----------------------------------------------------------------------------- procedural data


def _tiny(**kw):
    args = dict(num_cameras=4, held_out_cameras=2, num_train_ids=6, num_val_ids=3, num_test_ids=3,
                train_images_per_camera=2, eval_images_per_camera=2, image_size=(32, 16), p=3, k=2,
                eval_batch_size=16)
    args.update(kw)
    return MultiCameraReIDDataModule(**args)


def test_procedural_splits_cameras_and_queries():
    dm = _tiny()
    dm.setup("fit")
    assert dm.num_classes == 6 and dm.num_cameras == 4
    assert dm.camera_groups == {"seen": [0, 1], "held_out": [2, 3]}
    train, val, test = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert len(train) == 6 * 2 * 2 and len(val) == 3 * 2 * 2 and len(test) == 3 * 4 * 2
    assert set(train.camera_ids.tolist()) == {0, 1}  # held-out cameras never appear in training
    assert set(val.camera_ids.tolist()) == {0, 1}  # nor in model selection
    assert set(test.camera_ids.tolist()) == {0, 1, 2, 3}
    assert sorted(set(train.person_ids.tolist())) == list(range(6))  # training ids are class labels
    assert not set(val.person_ids.tolist()) & set(test.person_ids.tolist())  # disjoint identities
    assert not train.is_query.any()
    per = Counter(zip(test.person_ids[test.is_query].tolist(), test.camera_ids[test.is_query].tolist()))
    assert len(per) == 3 * 4 and set(per.values()) == {1}  # one query per identity and camera
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(BATCH_KEYS)
    assert batch["images"].shape == (6, 3, 32, 16) and batch["images"].dtype == torch.float32
    assert batch["camera_ids"].dtype == torch.long and batch["camera_ids"].shape == (6,)
    eval_batch = next(iter(dm.test_dataloader()))
    assert eval_batch["is_query"].any() and (~eval_batch["is_query"]).any()


def test_procedural_data_is_deterministic_per_seed_and_split_independent():
    a, b, c = _tiny(), _tiny(), _tiny(seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.splits["train"].images, b.splits["train"].images)
    assert torch.equal(a.splits["test"].images, b.splits["test"].images)
    assert not torch.equal(a.splits["train"].images, c.splits["train"].images)
    bigger = _tiny(num_test_ids=5)
    bigger.setup()
    assert torch.equal(a.splits["train"].images, bigger.splits["train"].images)


def test_cameras_have_their_own_look():
    ids = list(range(8))
    images, _, cams, _ = render_identities(0, "test", ids, [0, 1, 2], 2, (32, 16))
    mean_colour = torch.stack([images[cams == c].float().mean(dim=(0, 2, 3)) for c in range(3)])
    assert torch.cdist(mean_colour, mean_colour).masked_fill(torch.eye(3, dtype=torch.bool), 1e9).min() > 3.0
    neutral, _, _, _ = render_identities(0, "test", ids, [0, 1, 2], 2, (32, 16), camera_strength=0.0)
    assert camera_style(0, 1, 0.0).gains == (1.0, 1.0, 1.0)
    # with neutral cameras the same identity looks alike everywhere; the style moves images further apart
    def cross_camera_gap(imgs):
        x = imgs.float().view(8, 3, 2, -1).mean(dim=2)  # identity, camera, pixels
        return (x[:, 0] - x[:, 1]).abs().mean()
    assert cross_camera_gap(images) > cross_camera_gap(neutral)


def test_procedural_bad_configuration():
    with pytest.raises(ValueError, match="at least one of the 3 cameras"):
        MultiCameraReIDDataModule(num_cameras=3, held_out_cameras=3)
    with pytest.raises(ValueError, match="eval_images_per_camera"):
        MultiCameraReIDDataModule(eval_images_per_camera=1)

# ----------------------------------------------------------------------------- Market-1501 reader


def _write(folder, names, colour_of):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (32, 64), colour_of(name)).save(folder / name)


def _market(tmp_path):
    root = tmp_path / "Market-1501-v15.09.15"
    colour = {2: (200, 0, 0), 7: (0, 200, 0), 11: (0, 0, 200), 0: (90, 90, 90), -1: (200, 0, 0)}
    colour_of = lambda name: colour[parse_market1501_name(name)[0]]  # noqa: E731
    _write(root / "bounding_box_train", ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg",
                                         "0007_c2s3_070952_01.jpg", "0007_c3s3_071002_02.jpg",
                                         "0011_c6s1_000176_01.jpg", "0011_c1s1_000180_02.jpg"], colour_of)
    _write(root / "query", ["0002_c1s1_001051_00.jpg", "0007_c3s3_072002_00.jpg"], colour_of)
    _write(root / "bounding_box_test", ["0002_c1s1_001060_01.jpg", "0002_c4s2_002051_02.jpg",
                                        "0007_c2s3_070002_02.jpg", "0000_c5s1_000110_03.jpg",
                                        "-1_c2s1_000401_03.jpg", "-1_c1s1_000402_03.jpg"], colour_of)
    (root / "bounding_box_test" / "Thumbs.db").write_text("not an image")
    return root


def test_market1501_names():
    assert parse_market1501_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_market1501_name("-1_c6s2_000001_01.jpg") == (-1, 5)
    assert parse_market1501_name("0000_c3s1_000001_01.jpg") == (0, 2)
    assert parse_market1501_name("0001_c8_f0046182.jpg") == (1, 7)  # DukeMTMC-reID
    with pytest.raises(ValueError, match="not a Market-1501 file name"):
        parse_market1501_name("person_12.jpg")


def test_market1501_reader(tmp_path):
    dm = Market1501DataModule(_market(tmp_path), image_size=(32, 16), p=2, k=2, eval_batch_size=8, num_workers=0,
                              augment=False)
    assert dm.num_classes == 3 and dm.num_cameras == 6 and dm.camera_groups == {}
    dm.setup("fit")
    train = dm.splits["train"]
    assert sorted(train.person_ids.tolist()) == [0, 0, 1, 1, 2, 2]  # 0002, 0007, 0011 relabelled
    assert sorted(train.camera_ids.tolist()) == [0, 0, 1, 1, 2, 5]  # c1 -> camera 0
    test = dm.splits["test"]
    assert len(test) == 8 and int(test.is_query.sum()) == 2
    # by identity with queries first, distractors (0) and junk (-1) last
    assert test.person_ids.tolist() == [2, 2, 2, 7, 7, -1, -1, 0]
    batch = next(iter(dm.test_dataloader()))
    assert batch["images"].shape == (8, 3, 32, 16) and batch["camera_ids"].tolist() == [0, 0, 3, 2, 1, 0, 1, 4]

    # evaluation as the benchmark defines it, with the images' colours as features: the junk image has exactly
    # the query's colour but is ignored; the same-camera gallery image of 0002 is excluded
    metric = ReIDMetric(distance="euclidean")
    feats = batch["images"].mean(dim=(2, 3))
    metric.update(feats, batch["person_ids"], batch["camera_ids"], batch["is_query"], batch["indices"])
    result = metric.compute()
    assert float(result["mAP"]) == pytest.approx(1.0) and float(result["rank1"]) == 1.0
    assert int(result["num_queries"]) == 2


def test_market1501_held_out_cameras_and_errors(tmp_path):
    root = _market(tmp_path)
    dm = Market1501DataModule(root, held_out_cameras=[5], num_workers=0)
    assert dm.num_classes == 3 and dm.camera_groups["held_out"] == [5]
    dm.setup()
    assert 5 not in dm.splits["train"].camera_ids.tolist()
    with pytest.raises(ValueError, match=r"held_out_cameras \[9\]"):
        Market1501DataModule(root, held_out_cameras=[9])
    with pytest.raises(FileNotFoundError, match="bounding_box_train, root/query"):
        Market1501DataModule(tmp_path / "nowhere")

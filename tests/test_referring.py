"""Referring-expression comprehension: data (grammar, reader, vocabulary), network pieces, metric, task, recipe."""

from __future__ import annotations

import json
import math
import re

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import read_wandb_history
from PIL import Image
from torch import nn

from lightning_effnets.cli import main
from lightning_effnets.cost import profile
from lightning_effnets.data import RefCOCOStyleDataModule, ShapesReferringDataModule, Vocabulary
from lightning_effnets.data.referring import collate_referring, tokenize
from lightning_effnets.data.shapes_referring import COLOURS, generate_scene
from lightning_effnets.tasks import ReferringExpressionGrounder
from lightning_effnets.tasks.referring import (
    AdaptiveFeatureSelection,
    GroundingMetrics,
    TextEncoder,
    collect_diffuse,
    decode_boxes,
    encode_targets,
)

SMALL_DATA = ["--data.init_args.train_size=48", "--data.init_args.val_size=16", "--data.init_args.test_size=16",
              "--data.init_args.batch_size=8"]


# ============================================================================ vocabulary
def test_vocabulary_is_sorted_handles_unknown_words_and_names_hopeless_expressions():
    vocab = Vocabulary.build(["The red circle", "the BLUE square, left of the red circle"])
    assert vocab.itos == ["<pad>", "<unk>", "blue", "circle", "left", "of", "red", "square", "the"]
    assert vocab.encode("the green circle") == [8, 1, 3]  # "green" was never seen in training
    assert vocab.encode("red circle left of the square", max_length=3) == [6, 3, 4]
    assert vocab.decode([8, 6, 3, 0, 0]) == "the red circle"
    with pytest.raises(ValueError, match=r"'a purple hexagon'.*only words outside the vocabulary.*hexagon"):
        vocab.encode("a purple hexagon")
    with pytest.raises(ValueError, match="contains no words"):
        vocab.encode(" ?! ")
    assert Vocabulary.build(["a b", "b c", "b"], min_freq=2).words == ["b"]
    assert tokenize("The man's LEFT arm.") == ["the", "man", "s", "left", "arm"]


# ============================================================================ procedural scenes
_SIZE = {"small": "small", "little": "small", "large": "large", "big": "large"}
_REL = {"left of": "left", "to the left of": "left", "right of": "right", "to the right of": "right",
        "above": "above", "below": "below", "under": "below"}
_NP = r"(?:the )?(?:(small|little|large|big) )?(?:(red|green|blue|yellow) )?(circle|square|triangle)"
_EXPRESSION = re.compile(rf"^{_NP}(?: (to the left of|left of|to the right of|right of|above|below|under) {_NP})?$")


def _referents(expression, objects):
    """An independent interpreter of the grammar: the indices of the objects the expression can mean."""
    m = _EXPRESSION.match(expression)
    assert m, f"expression outside the grammar: {expression!r}"
    size, colour, shape, relation, a_size, a_colour, a_shape = m.groups()

    def fits(o, size, colour, shape):
        return o.shape == shape and (colour is None or o.colour == colour) and (size is None or o.size == _SIZE[size])

    matches = [i for i, o in enumerate(objects) if fits(o, size, colour, shape)]
    if relation is None:
        return matches
    anchors = [i for i, o in enumerate(objects) if fits(o, a_size, a_colour, a_shape)]
    assert len(anchors) == 1, f"anchor of {expression!r} is ambiguous"
    (ax, ay), rel = objects[anchors[0]].center, _REL[relation]

    def holds(o):
        x, y = o.center
        return {"left": x < ax, "right": x > ax, "above": y < ay, "below": y > ay}[rel]

    return [i for i in matches if i != anchors[0] and holds(objects[i])]


def test_generated_expressions_are_unambiguous_and_boxes_hold_the_target():
    rng = np.random.default_rng(123)
    relational = needed = 0
    for _ in range(300):
        scene = generate_scene(rng, image_size=64)
        assert _referents(scene.expression, scene.objects) == [scene.target], scene.expression
        m = _EXPRESSION.match(scene.expression)
        relational += m.group(4) is not None
        if scene.needs_relation:
            needed += 1
            assert len(_referents(scene.expression.split(" " + m.group(4) + " ")[0], scene.objects)) > 1
        # the target's colour is painted at its box centre
        target = scene.objects[scene.target]
        cx, cy = (int(v) for v in target.center)
        assert np.abs(scene.image[cy, cx].astype(int) - COLOURS[target.colour]).max() < 40
        boxes = np.array([o.box for o in scene.objects])
        assert boxes.min() >= 0 and boxes.max() <= 64 and (boxes[:, 2:] > boxes[:, :2]).all()
    assert 0.3 < relational / 300 < 0.9 and needed / 300 > 0.2  # relations are common, and often needed


def test_shapes_datamodule_is_deterministic_per_seed_and_split():
    a = ShapesReferringDataModule(train_size=20, val_size=5, test_size=5, seed=3)
    b = ShapesReferringDataModule(train_size=40, val_size=5, test_size=5, seed=3)
    c = ShapesReferringDataModule(train_size=20, val_size=5, test_size=5, seed=4)
    for i in range(5):
        sa, sb, sc = a.scene("val", i), b.scene("val", i), c.scene("val", i)
        assert sa.expression == sb.expression and np.array_equal(sa.image, sb.image)  # independent of train_size
        assert not np.array_equal(sa.image, sc.image)
    a.setup("fit")
    batch = next(iter(a.train_dataloader()))
    assert batch["images"].shape == (20, 3, 64, 64) and 0 <= batch["images"].min() and batch["images"].max() <= 1
    assert batch["tokens"].dtype == torch.long and batch["boxes"].shape == (20, 4)
    lengths = (batch["tokens"] != 0).sum(1)
    assert lengths.max() == batch["tokens"].shape[1]  # padded to the longest expression
    for tokens, expression in zip(batch["tokens"], batch["expressions"]):
        assert a.vocabulary.decode(tokens) == " ".join(tokenize(expression))
    with pytest.raises(ValueError, match="too small"):
        ShapesReferringDataModule(image_size=32, max_objects=6)


# ============================================================================ RefCOCO-style reader
def _write_refcoco(root, val_sentence="the dog"):
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(root / "images" / "a.png")
    Image.new("RGB", (30, 30), (10, 200, 10)).save(root / "images" / "b.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}, {"id": 2, "file_name": "b.png"}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [10, 5, 10, 5], "category_id": 1},
                        {"id": 11, "image_id": 2, "bbox": [0, 0, 15, 30]}],
        "refs": [{"ref_id": 0, "ann_id": 10, "split": "train",
                  "sentences": [{"sent": "the red cat on the left", "tokens": []}, "red cat"]},
                 {"ref_id": 1, "ann_id": 11, "split": "train", "sentences": [{"sent": "green dog"}]},
                 {"ref_id": 2, "ann_id": 11, "split": "val", "sentences": [{"sent": val_sentence}]},
                 {"ref_id": 3, "ann_id": 10, "split": "testA", "sentences": [{"sent": "cat"}]}],
    }
    (root / "refs.json").write_text(json.dumps(data))


def test_refcoco_reader_letterboxes_images_and_boxes(tmp_path):
    _write_refcoco(tmp_path)
    dm = RefCOCOStyleDataModule(tmp_path, test_split="testA", image_size=32, batch_size=4, num_workers=0)
    assert dm.vocabulary.words == ["cat", "dog", "green", "left", "on", "red", "the"]  # training sentences only
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert len(next(iter(dm.train_dataloader()))["expressions"]) == 3
    batch = collate_referring([dm.splits["train"][i] for i in range(3)])
    assert batch["expressions"] == ["the red cat on the left", "red cat", "green dog"]
    # a.png (40x20) is scaled by 32/40 = 0.8: bbox [10, 5, 10, 5] -> xyxy [8, 4, 16, 8]; b.png by 32/30
    torch.testing.assert_close(batch["boxes"], torch.tensor([[8.0, 4, 16, 8], [8, 4, 16, 8], [0, 0, 16, 32]]))
    image = batch["images"][0]
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image[:, :16, :].mean((1, 2)), torch.tensor([200, 10, 10]) / 255, atol=0.01, rtol=0)
    torch.testing.assert_close(image[:, 16:, :], torch.full((3, 16, 32), 0.5))  # padded bottom, not shifted
    assert batch["tokens"].tolist()[1] == [7, 2, 0, 0, 0, 0]  # "red cat"


def test_refcoco_reader_errors_name_the_problem(tmp_path):
    _write_refcoco(tmp_path / "a", val_sentence="a purple hexagon")
    with pytest.raises(ValueError, match="'a purple hexagon' has only words outside the vocabulary"):
        RefCOCOStyleDataModule(tmp_path / "a", test_split="testA", num_workers=0).setup("fit")
    _write_refcoco(tmp_path / "b")
    with pytest.raises(ValueError, match=r"no ref has split 'test'.*\['testA', 'train', 'val'\]"):
        RefCOCOStyleDataModule(tmp_path / "b", num_workers=0).setup("fit")
    (tmp_path / "b" / "images" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        RefCOCOStyleDataModule(tmp_path / "b", test_split="testA", num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="refs.json"):
        RefCOCOStyleDataModule(tmp_path / "missing")
    _write_refcoco(tmp_path / "c")
    data = json.loads((tmp_path / "c" / "refs.json").read_text())
    data["refs"][0]["ann_id"] = 99
    (tmp_path / "c" / "refs.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="ref 0 points to ann_id 99"):
        RefCOCOStyleDataModule(tmp_path / "c").vocabulary  # noqa: B018


# ============================================================================ network pieces
def test_collect_diffuse_matches_a_brute_force_loop():
    b, c, n, heads = 2, 6, 5, 3
    q, kc, kd, v = torch.randn(b, c), torch.randn(b, c, n), torch.randn(b, c, n), torch.randn(b, c, n)
    out = collect_diffuse(q, kc, kd, v, heads)
    d = c // heads
    expected = torch.zeros(b, c, n)
    for i in range(b):
        for h in range(heads):
            ch = slice(h * d, (h + 1) * d)
            logits = [float(q[i, ch] @ kc[i, ch, p]) / math.sqrt(d) for p in range(n)]
            weights = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
            gathered = sum(w * v[i, ch, p] for p, w in enumerate(weights))
            for p in range(n):
                gate = 1 / (1 + math.exp(-float(q[i, ch] @ kd[i, ch, p]) / math.sqrt(d)))
                expected[i, ch, p] = gate * gathered
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_adaptive_feature_selection_follows_the_text_weights():
    afs = AdaptiveFeatureSelection([4, 6, 8], [4, 8, 16], target=1, out_channels=5, text_dim=3).eval()
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    text = torch.randn(2, 3)
    out, weights = afs(feats, text)
    assert out.shape == (2, 5, 4, 4)
    assert weights.shape == (2, 3, 5)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 5))
    # the weights are a softmax over levels of each level's linear map of the text
    logits = torch.stack([linear(text) for linear in afs.level_weights], dim=1)
    torch.testing.assert_close(weights, logits.softmax(dim=1))

    def select(level):
        for i, linear in enumerate(afs.level_weights):
            linear.weight.zero_()
            linear.bias.fill_(50.0 if i == level else -50.0)

    with torch.no_grad():  # a text that selects only the coarsest level gives that level, upsampled
        select(2)
        coarse = nn.functional.interpolate(afs.levels[2](feats[2]), size=(4, 4), mode="bilinear")
        torch.testing.assert_close(afs(feats, text)[0], coarse)
        select(0)  # only the finest: average-pooled first
        torch.testing.assert_close(afs(feats, text)[0], afs.levels[0](nn.functional.avg_pool2d(feats[0], 2)))


def test_text_encoder_ignores_padding():
    enc = TextEncoder(vocab_size=10, embed_dim=8, hidden_dim=6).eval()
    with torch.no_grad():
        alone, _, _ = enc(torch.tensor([[2, 3, 4]]))
        padded, _, mask = enc(torch.tensor([[2, 3, 4, 0, 0], [5, 6, 7, 8, 9]]))
        other, _, _ = enc(torch.tensor([[5, 6, 7, 8, 9]]))
    torch.testing.assert_close(padded[0], alone[0])
    torch.testing.assert_close(padded[1], other[0])
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]


def test_box_encoding_hand_values_and_round_trip():
    anchors = torch.tensor([[16.0, 16.0], [32.0, 32.0]])
    # centre (18, 14) lies in cell (row 1, col 2) of an 8x8 grid with stride 8: offsets (0.25, 0.75); 16x16 box
    index, target = encode_targets(torch.tensor([[10.0, 6, 26, 22]]), anchors, 8, (8, 8))
    assert index.tolist() == [(1 * 8 + 2) * 2 + 0]
    torch.testing.assert_close(target, torch.tensor([[0.25, 0.75, 0.0, 0.0]]))
    boxes = torch.tensor([[3.0, 5, 40, 30], [50, 50, 63, 62], [0, 0, 64, 64]])
    index, target = encode_targets(boxes, anchors, 8, (8, 8))
    assert index.tolist()[2] % 2 == 1  # the big box goes to the big anchor
    raw = torch.zeros(3, 2 * 8 * 8, 5)
    raw[torch.arange(3), index, :2] = torch.logit(target[:, :2], eps=1e-6)
    raw[torch.arange(3), index, 2:4] = target[:, 2:]
    raw[torch.arange(3), index, 4] = 5.0
    raw = raw.reshape(3, 8, 8, 2, 5).permute(0, 3, 4, 1, 2).reshape(3, 10, 8, 8)  # back to the conv layout
    scores, decoded = decode_boxes(raw, anchors, 8)
    assert scores.argmax(1).tolist() == index.tolist()
    torch.testing.assert_close(decoded[torch.arange(3), index], boxes, atol=1e-3, rtol=0)


def test_grounding_metrics_hand_values_and_brute_force():
    metric = GroundingMetrics()
    preds = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    target = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 20], [20, 20, 30, 30]])
    metric.update(preds, target)  # IoUs 1, 50/150, 100/200 (counts: >= 0.5), 0
    result = metric.compute()
    assert result["acc"].item() == pytest.approx(0.5)
    assert result["miou"].item() == pytest.approx((1 + 1 / 3 + 0.5 + 0) / 4)

    def iou(p, t):
        w = max(0.0, min(p[2], t[2]) - max(p[0], t[0]))
        h = max(0.0, min(p[3], t[3]) - max(p[1], t[1]))
        union = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - w * h
        return w * h / union

    gen = torch.Generator().manual_seed(0)
    metric = GroundingMetrics(iou_threshold=0.3)
    all_ious = []
    for _ in range(3):
        xy = torch.rand(2, 16, 2, generator=gen) * 20
        wh = torch.rand(2, 16, 2, generator=gen) * 20 + 1
        p, t = torch.cat([xy, xy + wh], dim=2)
        metric.update(p, t)
        all_ious += [iou(a.tolist(), b.tolist()) for a, b in zip(p, t)]
    result = metric.compute()
    assert result["miou"].item() == pytest.approx(float(np.mean(all_ious)), abs=1e-6)
    assert result["acc"].item() == pytest.approx(float(np.mean(np.array(all_ious) >= 0.3)), abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        metric.update(torch.zeros(2, 4), torch.zeros(3, 4))


# ============================================================================ task
def _tiny_task(**kw):
    kw = {"backbone": "resnet10t", "vocab_size": 32, "image_size": 64, "hidden_dim": 32, "text_dim": 32,
          "embed_dim": 16, "log_samples": 0, **kw}
    return ReferringExpressionGrounder(**kw)


def test_task_contract_and_data_checks(tmp_path):
    task = _tiny_task()
    raw = task.model(*task.example_input_array)
    assert raw.shape == (1, 3 * 5, 8, 8)
    assert task.output_modules() == [task.model.head[-1]] and task.output_modules()[0].out_channels == 15
    assert profile(task.model, task.example_input_array, measure_latency=False).macs > 0

    dm = ShapesReferringDataModule(train_size=32, val_size=8, test_size=8, batch_size=8)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size=4\) is smaller.*Set model vocab_size: \d+"):
        trainer.fit(_tiny_task(vocab_size=4), dm)
    with pytest.raises(ValueError, match="image_size=96"):
        trainer.fit(_tiny_task(image_size=96), dm)
    with pytest.raises(ValueError, match="anchors"):
        _tiny_task(anchors=[[0.2, -1.0]])

    task = _tiny_task()
    trainer.fit(task, dm)
    assert task.vocabulary is dm.vocabulary
    batch = next(iter(dm.val_dataloader()))
    boxes = task.ground(batch["images"], batch["expressions"])
    assert boxes.shape == (8, 4) and (boxes >= 0).all() and (boxes <= 64).all()
    with pytest.raises(ValueError, match="'a purple hexagon' has only words outside the vocabulary"):
        task.ground(batch["images"][:2], ["the red circle", "a purple hexagon"])
    batch["tokens"][1] = 0
    with pytest.raises(ValueError, match=r"samples \[1\].*no words"):
        task.training_step(batch, 0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")
def test_task_learns_to_ground_a_fixed_batch():
    """A few dozen steps on one batch must drive the training metric up (the losses and targets agree)."""
    torch.manual_seed(0)
    dm = ShapesReferringDataModule(train_size=16, val_size=16, test_size=16, batch_size=16, image_size=32,
                                   max_objects=3)
    task = _tiny_task(image_size=32, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), lr_schedule="constant")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    task.vocabulary = dm.vocabulary
    optim = task.configure_optimizers()
    task.train()
    first = None
    for _ in range(60):
        loss, _, _ = task._shared_step(batch, "train")
        optim.zero_grad()
        loss.backward()
        optim.step()
        first = first if first is not None else loss.item()
    task.metrics["train_grounding"].reset()
    task.eval()
    with torch.no_grad():
        task._shared_step(batch, "train")
    assert float(loss) < 0.5 * first
    assert task.metrics["train_grounding"].compute()["acc"] >= 0.75


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_dependency_graph_pruning_keeps_the_network_consistent():
    """Channel pruning (Torch-Pruning) must be able to trace and shrink ``task.model``: the fusion, AFS and GRU
    are written without concatenations of untraceable tensors for this reason."""
    import torch_pruning as tp

    task = _tiny_task(hidden_dim=32, text_dim=32)
    net = task.model.eval()
    before = profile(net, task.example_input_array, measure_latency=False).macs
    pruner = tp.pruner.MagnitudePruner(net, example_inputs=task.example_input_array,
                                       importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                       ignored_layers=[*task.output_modules(), net.text], round_to=2)
    pruner.step()
    assert net(*task.example_input_array).shape == (1, 15, 8, 8)
    assert net.fuse.visual.out_channels == net.reasoning[0].query.out_features < 32
    assert profile(net, task.example_input_array, measure_latency=False).macs < 0.6 * before


# ============================================================================ recipe
def test_recipe_runs_with_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "referring/baseline", "--trainer.fast_dev_run=true", "--trainer.logger=false",
                "--trainer.callbacks=[]", *SMALL_DATA])
    assert cli.trainer.global_step == 1 and cli.trainer.state.finished
    assert isinstance(cli.model, ReferringExpressionGrounder)


def test_recipe_logs_metrics_and_checkpoint_keeps_the_vocabulary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "referring/baseline", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1",
                *SMALL_DATA])
    history = read_wandb_history(next((tmp_path / "wandb").glob("offline-run-*")))
    for key in ("train/loss_step", "val/acc", "val/miou", "test/acc", "test/miou", "val/samples/count",
                "effnets/cost/start/macs"):
        assert key in history, f"{key} not logged; logged: {sorted(history)}"
    assert len(history["train/loss_step"]) == 2
    assert 0.0 <= history["test/acc"][-1] <= 1.0 and history["val/samples/count"][-1] == 8
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    restored = ReferringExpressionGrounder.load_from_checkpoint(checkpoint)
    assert restored.vocabulary.itos == cli.datamodule.vocabulary.itos
    batch = collate_referring([cli.datamodule.splits["test"][i] for i in range(2)])
    torch.testing.assert_close(restored.ground(batch["images"], batch["expressions"]),
                               cli.model.cpu().ground(batch["images"], batch["expressions"]))

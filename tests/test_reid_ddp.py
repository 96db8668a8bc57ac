"""PersonReID under DDP (2 CPU processes, gloo, ``ddp_spawn``); assertions run inside the workers.

* Training: Lightning keeps our :class:`PKSampler` (it is a ``DistributedSampler``), each rank gets complete P x K
  batches and the two ranks' batches are disjoint.
* Evaluation: the metric gathers both ranks' images, counts the ones the padding sampler repeats once, and every
  rank reports the brute-force mAP / rank-1 of the whole query/gallery set.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from test_reid import _DictDataset, _expected, _retrieval_problem
from torch.utils.data import DataLoader

from lightning_effnets.data import PKSampler, ReIDDataModule, ReIDDataset
from lightning_effnets.data.reid import reid_transform
from lightning_effnets.tasks import PersonReID


class _FeatureReIDData(ReIDDataModule):
    """Training: random 16x8 images of 8 identities; validation: a fixed retrieval problem given as features."""

    num_classes, num_cameras, held_out_cameras = 8, 4, []

    def __init__(self, problem) -> None:
        super().__init__(image_size=(16, 8), p=4, k=2, eval_batch_size=8)
        self.problem = problem

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        pids = torch.arange(8).repeat_interleave(6)
        images = (torch.rand(len(pids), 3, 16, 8, generator=g) * 255).to(torch.uint8)
        self.splits["train"] = ReIDDataset(pids, pids % 4, images=images, transform=reid_transform((16, 8), False, False))
        feats, ids, cams, query = self.problem
        self.splits["val"] = _DictDataset(images=torch.from_numpy(feats)[:, :, None, None],
                                          person_ids=torch.from_numpy(ids), camera_ids=torch.from_numpy(cams),
                                          is_query=torch.from_numpy(query), indices=torch.arange(len(ids)))


class _CheckedReID(PersonReID):
    def __init__(self, expected: tuple[float, float]) -> None:
        super().__init__(backbone="resnet10t", num_classes=8, image_size=(16, 8), log_samples=0,
                         lr_schedule="constant")
        self.expected = expected
        self.checked_batches = 0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        assert self.trainer.world_size == 2
        sampler = self.trainer.train_dataloader.sampler
        assert isinstance(sampler, PKSampler), type(sampler)  # not wrapped or replaced by Lightning
        assert (sampler.rank, sampler.num_replicas) == (self.global_rank, 2)
        ids = batch["person_ids"]
        assert len(ids) == 8 and len(set(ids.tolist())) == 4 and (ids.view(4, 2) == ids.view(4, 2)[:, :1]).all()
        both = self.all_gather(batch["indices"])
        assert not set(both[0].tolist()) & set(both[1].tolist())  # the ranks train on different images
        self.checked_batches += 1

    def validation_step(self, batch, batch_idx: int) -> None:
        """Evaluate the given features (the validation 'images' are embeddings) through the task's metric."""
        feats = batch["images"].flatten(1)
        self.val_metric.update(feats, batch["person_ids"], batch["camera_ids"], batch["is_query"], batch["indices"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            return
        metrics = self.trainer.callback_metrics
        assert abs(float(metrics["val/mAP"]) - self.expected[0]) < 1e-5, (float(metrics["val/mAP"]), self.expected)
        assert abs(float(metrics["val/rank1"]) - self.expected[1]) < 1e-6
        assert self.checked_batches == 2


def test_ddp_sampler_sharding_and_gathered_evaluation():
    problem = _retrieval_problem(seed=3, n=61)  # odd size: the DistributedSampler pads one rank with a repeat
    mAP, cmc, _ = _expected(*problem, mask=np.ones(61, bool))
    task = _CheckedReID((mAP, float(cmc[0])))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=2,
                         limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=_FeatureReIDData(problem))


"""Test environment: fully offline, W&B and Lightning outputs in a temp dir, deterministic seeds."""

import os
import tempfile

# Must happen before timm (or anything that imports huggingface_hub) is imported: a stray
# pretrained=True would otherwise hang in network retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
_WANDB_TMP = tempfile.mkdtemp(prefix="effnets-wandb-")
for _var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
    os.environ.setdefault(_var, _WANDB_TMP)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import structural_similarity
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_effnets.cli import main
from lightning_effnets.data import ImageFolderSRDataModule, PhotoSRDataModule
from lightning_effnets.data.super_resolution import (
    HRImage,
    PairedCropDataset,
    WholeImageDataset,
    bicubic_downsample,
    modcrop,
)
from lightning_effnets.tasks import SuperResolver
from lightning_effnets.tasks.super_resolution import rgb_to_y


def _trainer(**kw):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(kw)
    return pl.Trainer(**defaults)


class _NearestPlus(nn.Module):
    """A fake SR network: nearest-neighbour upsampling plus a fixed per-image perturbation."""

    def __init__(self, scale, perturbations):
        super().__init__()
        self.scale, self.perturbations, self.calls = scale, perturbations, 0

    def forward(self, lr):
        out = torch.nn.functional.interpolate(lr, scale_factor=self.scale, mode="nearest")
        out = out + self.perturbations[self.calls]
        self.calls += 1
        return out


def _y_numpy(rgb_chw):
    """Independent Y channel: scikit-image's rgb2ycbcr (ITU-R BT.601, Y in [16, 235]) scaled to [0, 1]."""
    return rgb2ycbcr(np.asarray(rgb_chw, dtype=np.float64).transpose(1, 2, 0))[..., 0] / 255.0


def test_y_channel_is_bt601():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 4)
    y = rgb_to_y(rgb).flatten() * 255
    assert y.tolist() == pytest.approx([235.0, 16.0, 16 + 65.481, 16 + 128.553], abs=1e-4)
    image = torch.rand(3, 9, 11, dtype=torch.float64)
    np.testing.assert_allclose(rgb_to_y(image[None])[0, 0].numpy(), _y_numpy(image.numpy()), atol=1e-12)


def test_psnr_and_ssim_match_known_noise_levels():
    """Two images: a constant RGB offset of 4/255 (Y moves by 219/255 of it, so PSNR is known in closed form)
    and Gaussian noise; borders (= scale) carry a huge error that the protocol must ignore."""
    scale, gen = 2, torch.Generator().manual_seed(0)
    lr = (torch.randint(40, 200, (2, 3, 16, 20), generator=gen) / 255.0)
    hr = torch.nn.functional.interpolate(lr, scale_factor=scale, mode="nearest")  # what the fake net reproduces
    offset = torch.full((1, 3, 32, 40), 4 / 255)
    noise = torch.randint(-20, 21, (1, 3, 32, 40), generator=gen) / 255.0  # 8-bit levels survive quantisation
    for p in (offset, noise):
        p[..., :scale, :] = p[..., -scale:, :] = p[..., :, :scale] = p[..., :, -scale:] = 0.5
    task = SuperResolver(scale=scale, n_resblocks=0, n_feats=4, log_samples=0)
    task.model = _NearestPlus(scale, [offset, noise])
    result = _trainer().validate(task, DataLoader(TensorDataset(lr, hr), batch_size=1), verbose=False)[0]

    y_step = (65.481 + 128.553 + 24.966) / 255 * 4 / 255  # Y difference of the constant offset
    psnr_offset = 10 * math.log10(1 / y_step**2)
    assert psnr_offset == pytest.approx(37.41, abs=0.01)
    # the noisy image: brute force on the Y channel of the shaved images (8-bit SR, clamped)
    sr = (hr[1:] + noise).clamp(0, 1)
    y_sr, y_hr = _y_numpy(sr[0, :, 2:-2, 2:-2]), _y_numpy(hr[1, :, 2:-2, 2:-2])
    mse_noise = np.mean((y_sr - y_hr) ** 2)
    psnr_noise = 10 * math.log10(1 / mse_noise)
    # mean of per-image PSNRs (the benchmark convention), not the PSNR of the pooled MSE (~1 dB apart here)
    assert result["val/psnr"] == pytest.approx((psnr_offset + psnr_noise) / 2, abs=1e-3)
    assert abs(result["val/psnr"] - 10 * math.log10(2 / (y_step**2 + mse_noise))) > 0.5
    ssim_offset = structural_similarity(_y_numpy((hr[0] + offset[0])[:, 2:-2, 2:-2]), _y_numpy(hr[0, :, 2:-2, 2:-2]),
                                        data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    ssim_noise = structural_similarity(y_sr, y_hr, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False)
    assert result["val/ssim"] == pytest.approx((ssim_offset + ssim_noise) / 2, abs=3e-3)
    assert result["val/ssim"] < 0.999

    # bicubic reference of the same images, by an independent route
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    bicubic = (bicubic * 255).round() / 255
    expected = np.mean([10 * math.log10(1 / np.mean((_y_numpy(b[:, 2:-2, 2:-2]) - _y_numpy(h[:, 2:-2, 2:-2])) ** 2))
                        for b, h in zip(bicubic, hr)])
    assert result["val/psnr_bicubic"] == pytest.approx(expected, abs=1e-3)
    assert result["val/psnr_gain"] == pytest.approx(result["val/psnr"] - expected, abs=1e-3)


def test_training_crops_equal_crops_of_the_whole_low_resolution_image():
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 75, 101), dtype=torch.uint8, generator=gen)
    for scale in (2, 3):
        data = PairedCropDataset([HRImage("noise", 75, 101, lambda: image)], scale, 12 * scale, length=16,
                                 augment=False)
        hr_full = image[:, :75 - 75 % scale, :101 - 101 % scale].float() / 255
        lr_full = bicubic_downsample(hr_full, scale)
        for i in range(16):
            lr, hr = data[i]
            # locate the HR crop in the image, then compare with the same crop of the whole LR image
            hits = [(t, l) for t in range(0, hr_full.shape[1] - hr.shape[1] + 1, scale)
                    for l in range(0, hr_full.shape[2] - hr.shape[2] + 1, scale)
                    if torch.equal(hr_full[:, t:t + hr.shape[1], l:l + hr.shape[2]], hr)]
            assert len(hits) == 1
            t, l = hits[0][0] // scale, hits[0][1] // scale
            torch.testing.assert_close(lr, lr_full[:, t:t + 12, l:l + 12], atol=1e-6, rtol=0)
    # LR images are 8-bit levels, and bicubic shrinking keeps a constant image constant
    assert torch.equal(lr_full, (lr_full * 255).round() / 255)
    flat = bicubic_downsample(torch.full((3, 12, 18), 100 / 255), 3)
    torch.testing.assert_close(flat, torch.full((3, 4, 6), 100 / 255))


def test_edsr_shapes_and_output_modules():
    for scale, upsample_convs in ((2, 1), (3, 1), (4, 2)):
        task = SuperResolver(scale=scale, n_resblocks=2, n_feats=8)
        out = task(torch.rand(2, 3, 10, 7))
        assert out.shape == (2, 3, 10 * scale, 7 * scale)
        convs = [m for m in task.model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 1 + 2 * 2 + 1 + upsample_convs + 1  # head, blocks, body end, upsampler, tail
        outputs = task.output_modules()
        assert outputs[-1] is task.model.tail and outputs[-1].out_channels == 3
        assert [m.out_channels for m in outputs[:-1]] == [8 * (scale if scale == 3 else 2) ** 2] * upsample_convs
        assert all(any(m is c for c in convs) for m in outputs)
    with pytest.raises(ValueError, match="scale must be 2, 3, 4 or 8"):
        SuperResolver(scale=5)
    # with a zero tail the network outputs its skip: the bicubic image, or the input mean without the skip
    lr = torch.rand(1, 3, 6, 5)
    for skip in (True, False):
        task = SuperResolver(scale=3, n_resblocks=1, n_feats=8, bicubic_skip=skip)
        nn.init.zeros_(task.model.tail.weight), nn.init.zeros_(task.model.tail.bias)
        expected = (torch.nn.functional.interpolate(lr, scale_factor=3, mode="bicubic") if skip
                    else torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1).expand(1, 3, 18, 15))
        torch.testing.assert_close(task(lr), expected)


def _write(path, h, w, seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def test_image_folder_reader(tmp_path):
    first = _write(tmp_path / "DIV2K_train_HR" / "0001.png", 40, 50, 1)
    second = _write(tmp_path / "DIV2K_train_HR" / "0002.png", 33, 36, 2)
    (tmp_path / "DIV2K_train_HR" / "notes.txt").write_text("not an image")
    val = _write(tmp_path / "Set5" / "baby.png", 27, 30, 3)  # modcrop to 26x30 at x2
    dm = ImageFolderSRDataModule(tmp_path, scale=2, crop_size=32, batch_size=4, patches_per_epoch=8,
                                 train_dir="DIV2K_train_HR", val_dir="Set5", test_dir="missing", augment=False,
                                 num_workers=0)
    dm.setup()
    assert [i.name.rsplit("/", 1)[-1] for i in dm.splits["train"].images] == ["0001.png", "0002.png"]
    lr, hr = next(iter(dm.train_dataloader()))
    assert lr.shape == (4, 3, 16, 16) and hr.shape == (4, 3, 32, 32)
    # the images are cycled through: crops 0 and 2 come from 0001.png, 1 and 3 from 0002.png, on the x2 grid
    for crop, array in zip(hr, (first, second, first, second)):
        source = torch.from_numpy(array).permute(2, 0, 1).float() / 255
        assert any(torch.equal(crop, source[:, t:t + 32, l:l + 32])
                   for t in range(0, source.shape[1] - 31, 2) for l in range(0, source.shape[2] - 31, 2))
    lr, hr = dm.splits["test"][0]  # test falls back to the val folder
    assert hr.shape == (3, 26, 30) and lr.shape == (3, 13, 15)
    np.testing.assert_array_equal((hr * 255).round().byte().permute(1, 2, 0).numpy(), val[0:26])
    assert torch.equal(modcrop(torch.zeros(1, 27, 31), 3), torch.zeros(1, 27, 30))


def test_bad_input_names_the_sample(tmp_path):
    _write(tmp_path / "train" / "big.png", 64, 64)
    _write(tmp_path / "train" / "tiny.png", 30, 64)
    _write(tmp_path / "val" / "odd.png", 33, 40)
    with pytest.raises(ValueError, match=r"tiny\.png.*30x64.*smaller than crop_size=32"):
        ImageFolderSRDataModule(tmp_path, scale=2, crop_size=32, num_workers=0).setup()
    (tmp_path / "train" / "tiny.png").unlink()
    with pytest.raises(ValueError, match=r"odd\.png.*33x40.*scale=2 does not divide.*modcrop=True"):
        ImageFolderSRDataModule(tmp_path, scale=2, crop_size=32, modcrop=False, num_workers=0).setup()
    ImageFolderSRDataModule(tmp_path, scale=2, crop_size=32, modcrop=True, num_workers=0).setup()
    with pytest.raises(ValueError, match="crop_size=31 must be a multiple of scale=2"):
        ImageFolderSRDataModule(tmp_path, scale=2, crop_size=31)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSRDataModule(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"'coffee' is in both train and test"):
        PhotoSRDataModule(test=("coffee",))
    with pytest.raises(ValueError, match="unknown photo 'lena'"):
        PhotoSRDataModule(val=("lena",))
    with pytest.raises(ValueError, match=r"evaluation image 'speck' is 6x6.*smaller than 8 px"):
        WholeImageDataset([HRImage("speck", 6, 6, lambda: torch.zeros(3, 6, 6, dtype=torch.uint8))], scale=2)


def test_scale_mismatch_fails_before_training():
    task = SuperResolver(scale=3, n_resblocks=1, n_feats=8)
    with pytest.raises(ValueError, match=r"scale=3.*PhotoSRDataModule.scale = 2.*model.init_args.scale"):
        _trainer(max_steps=1).fit(task, datamodule=PhotoSRDataModule(scale=2, crop_size=32, patches_per_epoch=4))
    with pytest.raises(ValueError, match=r"HR = LR x 3"):
        task.training_step((torch.rand(1, 3, 8, 8), torch.rand(1, 3, 16, 16)), 0)


def test_photos_are_bundled_and_split():
    dm = PhotoSRDataModule(scale=3, crop_size=48, patches_per_epoch=5, batch_size=5)
    dm.setup()
    names = {split: [i.name for i in dm.splits[split].images] for split in ("train", "val", "test")}
    assert names["val"] == ["chelsea"] and names["test"] == ["flower", "camera"]
    assert not set(names["train"]) & (set(names["val"]) | set(names["test"]))
    lr, hr = dm.splits["val"][0]
    assert hr.shape == (3, 300, 450) and lr.shape == (3, 100, 150)  # 300x451 modcropped to a multiple of 3
    lr, hr = next(iter(dm.train_dataloader()))
    assert lr.shape == (5, 3, 16, 16) and hr.shape == (5, 3, 48, 48)


def test_recipe_runs_with_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "super_resolution/baseline", "--trainer.fast_dev_run=true",
                "--trainer.logger=false", "--trainer.callbacks=[]", "--model.init_args.n_resblocks=2"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert {"val/psnr", "val/ssim", "val/psnr_bicubic", "val/psnr_gain"} <= set(metrics)
    assert 20 < float(metrics["val/psnr_bicubic"]) < 40


class _ImageRecorder(pl.loggers.Logger):
    """A logger that keeps what ``log_image`` receives (W&B's signature)."""

    def __init__(self):
        super().__init__()
        self.images = {}

    name, version = "recorder", 0

    def log_image(self, key, images, step=None, **kwargs):
        self.images[key] = (images, kwargs.get("caption"))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_validation_logs_lr_bicubic_sr_hr_crops():
    gen = torch.Generator().manual_seed(2)
    lr = torch.randint(0, 256, (1, 3, 30, 40), generator=gen) / 255.0
    hr = torch.rand(1, 3, 60, 80, generator=gen)
    task = SuperResolver(scale=2, n_resblocks=1, n_feats=8, log_samples=1, sample_crop=33)
    recorder = _ImageRecorder()
    _trainer(logger=recorder).validate(task, DataLoader(TensorDataset(lr, hr), batch_size=1), verbose=False)
    images, captions = recorder.images["val/samples/0"]
    assert [c.split(": ")[1] for c in captions] == ["LR (x2 nearest)", "bicubic", "SR", "HR"]
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)  # 33 -> a multiple of 2
    top, left = 14, 24  # centred crop on the x2 grid
    hr_crop = (hr[0, :, top:top + 32, left:left + 32].permute(1, 2, 0) * 255).round().byte().numpy()
    np.testing.assert_array_equal(images[3], hr_crop)
    lr_pixel = (lr[0, :, top // 2, left // 2] * 255).round().byte().numpy()
    assert (images[0][:2, :2] == lr_pixel).all()  # each LR pixel shown as a 2x2 block
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    expected = (bicubic[0, :, top:top + 32, left:left + 32].permute(1, 2, 0) * 255).round().byte().numpy()
    np.testing.assert_array_equal(images[1], expected)

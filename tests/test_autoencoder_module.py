"""Training the first-stage autoencoder (src/autoencoder_module.py): its losses against closed forms and references,
the discriminator's start step, and the command line (fit, test, the saved file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from src.autoencoder_module import (
    LPIPS,
    AutoencoderModule,
    PatchDiscriminator,
    adaptive_weight,
    hinge_discriminator_loss,
    laplace_nll,
)
from src.data import DATASETS
from src.errors import ConfigError
from src.models.autoencoder import AutoencoderKL, VQModel, load_autoencoder, save_autoencoder

ROOT = Path(__file__).resolve().parents[1]
needs_fashion_mnist = pytest.mark.skipif(
    not any(Path(d).is_dir() for d in DATASETS["fashion_mnist"].system_dirs),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)
TINY = {"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
        "latent_channels": 2, "norm_num_groups": 4}  # fmt: skip


def test_laplace_nll_is_the_laplace_negative_log_likelihood_up_to_log_2() -> None:
    """sum |x - mu| / b + log b over pixels = -log Laplace(x; mu, b) - log 2 per pixel, b = exp(logvar)."""
    generator = torch.Generator().manual_seed(0)
    x, mu = torch.randn(3, 1, 5, 5, generator=generator), torch.randn(3, 1, 5, 5, generator=generator)
    logvar = torch.tensor(0.7)
    reference = -torch.distributions.Laplace(mu, logvar.exp()).log_prob(x).sum() / 3 - 25 * torch.log(torch.tensor(2.0))
    assert torch.allclose(laplace_nll((x - mu).abs(), logvar), reference, atol=1e-5)


def test_hinge_loss_closed_form() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 2] (mean 1)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer() -> None:
    """On a linear last layer y = W x the gradients are closed-form: d(sum a*y)/dW = a x^T."""
    x = torch.tensor([1.0, 2.0])
    weight = torch.tensor([[0.5, -1.0], [2.0, 0.3]], requires_grad=True)
    y = weight @ x
    nll, generator_loss = (3.0 * y).sum(), (torch.tensor([1.0, -2.0]) * y).sum()
    expected = (3.0 * torch.ones(2, 1) * x).norm() / ((torch.tensor([[1.0], [-2.0]]) * x).norm() + 1e-4)
    assert adaptive_weight(nll, generator_loss, weight).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(("size", "layers", "patches"), [(28, 2, 5), (28, 3, 1), (64, 3, 6)])
def test_patch_discriminator_outputs_one_logit_per_patch(size: int, layers: int, patches: int) -> None:
    logits = PatchDiscriminator(1, 8, layers)(torch.randn(2, 1, size, size))
    assert logits.shape == (2, 1, patches, patches)


def train(module: AutoencoderModule, steps: int, images: torch.Tensor, root: Path) -> None:
    """Fit on `images`; the end of fit saves autoencoder.pt into `root` (the trainer's folder without a logger)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(len(images))), batch_size=4)
    trainer = L.Trainer(max_steps=steps, default_root_dir=root, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(module, loader)


def test_discriminator_trains_from_its_start_step_only(tmp_path: Path) -> None:
    """Before disc_start neither the discriminator's weights nor its optimizer move; after it, each batch steps both
    networks once, and a step still counts one per batch (max_steps means batches)."""
    L.seed_everything(0)
    images = torch.rand(16, 1, 16, 16) * 2 - 1
    module = AutoencoderModule(AutoencoderKL(**TINY), image_size=16, disc_start=3, disc_layers=2, disc_channels=8)
    initial = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    initial_net = {k: v.clone() for k, v in module.net.state_dict().items()}
    train(module, 3, images, tmp_path)
    assert module.trainer.global_step == 3
    after = module.discriminator.state_dict()
    assert all(torch.equal(initial[k], after[k]) for k in initial)  # never called: BatchNorm's statistics too
    assert not all(torch.equal(initial_net[k], v) for k, v in module.net.state_dict().items())
    # A new trainer counts from 0 again: steps 3 and 4 of these 5 train the discriminator.
    before = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    train(module, 5, images, tmp_path)
    assert module.trainer.global_step == 5
    changed = [k for k, v in module.discriminator.state_dict().items() if not torch.equal(before[k], v)]
    assert "main.0.weight" in changed and "main.0.bias" in changed


def test_vq_training_counts_code_usage_over_the_epoch(tmp_path: Path) -> None:
    L.seed_everything(0)
    net = VQModel(**TINY, num_embeddings=16)
    module = AutoencoderModule(net, image_size=16)
    logged = {}
    module.log_dict = lambda values, **kwargs: logged.update({k: float(v) for k, v in values.items()})
    train(module, 4, torch.rand(16, 1, 16, 16) * 2 - 1, tmp_path)
    # 4 batches of 4 images of 8x8 latent positions were counted, then logged and cleared at the epoch's end.
    assert 0 < logged["train/codes_used"] <= 1 and 1 <= logged["train/code_perplexity"] <= 16
    assert module.code_counts.sum() == 0


def test_bad_options_fail_in_one_line() -> None:
    with pytest.raises(ConfigError, match="lpips_vgg_path"):
        AutoencoderModule(AutoencoderKL(**TINY), perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="no such file"):
        AutoencoderModule(AutoencoderKL(**TINY), perceptual_weight=1.0, lpips_vgg_path="missing-vgg16.pth")
    with pytest.raises(ConfigError, match="not divisible by the autoencoder's downsampling factor 2"):
        AutoencoderModule(AutoencoderKL(**TINY), image_size=15)
    with pytest.raises(ConfigError, match="AutoencoderKL or a VQModel"):
        AutoencoderModule(torch.nn.Conv2d(1, 1, 1))


def test_lpips_reads_a_torchvision_vgg16_file(tmp_path: Path) -> None:
    """The backbone's weights land where torchmetrics' LPIPS network has them: our LPIPS equals torchmetrics' own
    module carrying the same (here random) VGG16 weights."""
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    reference = _LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()
    state = {}
    for name, value in reference.net.named_parameters():
        _, index, kind = name.split(".")
        state[f"features.{index}.{kind}"] = value.detach().clone()
    torch.save(state, tmp_path / "vgg16.pth")
    lpips = LPIPS(str(tmp_path / "vgg16.pth"))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, y), reference(x, y), atol=1e-6)
    gray = lpips(x[:, :1], y[:, :1])
    assert gray.shape == (2, 1, 1, 1) and torch.isfinite(gray).all()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    net = AutoencoderKL(**TINY).eval()
    path = save_autoencoder(net, tmp_path / "ae.pt")
    loaded = load_autoencoder(path)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded(x)[0], net(x)[0]) and loaded.config == net.config
    with pytest.raises(FileNotFoundError, match="autoencoder_main fit"):
        load_autoencoder(tmp_path / "missing.pt")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.autoencoder_main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@needs_fashion_mnist
def test_cli_fit_then_test_with_the_shipped_config(tmp_path: Path) -> None:
    """The shipped recipe through the command line: a few steps of fit write a checkpoint, autoencoder.pt and a
    reconstruction grid; test on the checkpoint logs PSNR and the reconstruction Fréchet distance."""
    config = str(ROOT / "configs" / "fashion_mnist_autoencoder.yaml")
    common = ["--config", config, "--trainer.default_root_dir", str(tmp_path), "--logger_backend", "csv"]
    fit = run_cli("fit", *common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
                  "--trainer.limit_val_batches", "1", "--data.batch_size", "8", cwd=ROOT)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    saved = list(tmp_path.rglob("autoencoder.pt"))
    assert len(saved) == 1 and list(tmp_path.rglob("reconstructions/step_0000004.png"))
    assert load_autoencoder(saved[0]).config["latent_channels"] == 4
    test = run_cli("test", *common, "--ckpt_path", "last", "--trainer.limit_test_batches", "2",
                   "--model.fd_extractor", "standin", cwd=ROOT)  # fmt: skip
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/psnr" in test.stdout and "test/fd_standin" in test.stdout


@needs_fashion_mnist
def test_fit_starts_from_an_autoencoder_file(tmp_path: Path) -> None:
    """--model.init_from: a second fit (here with the discriminator from step 0, LDM's schedule as two runs) starts
    from a saved autoencoder's weights; at learning rate 0 they come out unchanged. Another architecture's file is a
    one-line error."""
    net = AutoencoderKL(**{**TINY, "latent_channels": 4, "block_out_channels": [8, 16, 16]})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    source = save_autoencoder(net, tmp_path / "source.pt")
    config = str(ROOT / "configs" / "fashion_mnist_autoencoder.yaml")
    common = ["fit", "--config", config, "--logger_backend", "csv", "--trainer.max_steps", "2",
              "--trainer.limit_val_batches", "0", "--data.batch_size", "8", "--model.init_from", str(source),
              *(f"--model.net.init_args.{k}={v}" for k, v in
                {"block_out_channels": "[8, 16, 16]", "layers_per_block": 1, "norm_num_groups": 4}.items())]  # fmt: skip
    fit = run_cli(*common, "--trainer.default_root_dir", str(tmp_path / "a"), "--model.lr", "0",
                  "--model.disc_start", "0", "--model.disc_layers", "2", cwd=ROOT)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    (saved,) = (tmp_path / "a").rglob("autoencoder.pt")
    after = load_autoencoder(saved).state_dict()
    assert all(torch.equal(after[k], v) for k, v in net.state_dict().items())
    bad = run_cli(*common, "--trainer.default_root_dir", str(tmp_path / "b"), "--model.net.init_args.latent_channels",
                  "3", cwd=ROOT)  # fmt: skip
    assert bad.returncode != 0
    (line,) = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
    assert "--model.init_from" in line and "differs from --model.net in latent_channels" in line

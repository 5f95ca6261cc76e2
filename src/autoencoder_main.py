"""Command line for latent diffusion's first stage: python -m src.autoencoder_main fit --config
configs/fashion_mnist_autoencoder.yaml.

The same LightningCLI as `src.main` (data module, loggers, checkpoints, fault handling, exact resume), with
`AutoencoderModule` as the model; see src/autoencoder_module.py.
"""

from src.autoencoder_module import AutoencoderModule
from src.main import run

if __name__ == "__main__":
    run(AutoencoderModule)

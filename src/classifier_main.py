"""Command line for the guidance classifier: python -m src.classifier_main fit --config configs/<x>_classifier.yaml.

The same LightningCLI as `src.main` (data module, loggers, checkpoints, fault handling), with `ClassifierModule`
as the model; see src/classifier_module.py.
"""

from src.classifier_module import ClassifierModule
from src.main import run

if __name__ == "__main__":
    run(ClassifierModule)

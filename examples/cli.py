"""Configure the stability callbacks from YAML with LightningCLI.

python examples/cli.py fit --config examples/stability.yaml
"""

from digits import DigitsClassifier, DigitsDataModule
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()

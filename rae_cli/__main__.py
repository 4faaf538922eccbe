"""``python -m rae_cli`` (and so ``torchrun -m rae_cli <command>``)."""

from rae_cli.cli import main

if __name__ == "__main__":
    main()

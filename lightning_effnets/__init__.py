"""lightning-effnets: efficient-network methods as PyTorch Lightning callbacks for any task."""

__version__ = "0.1.0"

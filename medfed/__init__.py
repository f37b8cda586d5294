"""medfed: federated learning across hospitals with differential privacy."""

__version__ = "0.1.0"

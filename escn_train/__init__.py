"""escn-train: training and deployment of eSCN interatomic potentials."""

__version__ = "0.1.0"

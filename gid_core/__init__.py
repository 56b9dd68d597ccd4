"""gid_core: General Instance Distillation (Dai et al., CVPR 2021) on torchvision detectors."""

__version__ = "0.1.0"

"""esdbs_ray: efficient ensemble sparse CNNs with dynamic batch size, trained on Ray Tune.

Implements Zheng, Wang & Gupta, "Efficient Ensemble Sparse Convolutional Neural Networks with Dynamic
Batch Size": Winograd-ReLU convolutions pruned in the Winograd domain, a dynamic batch size schedule,
and weighted-average stacking of heterogeneous base CNNs -- with the reading of the paper fixed in
``shared/spec/method.md``.
"""
__version__ = "0.1.0"

"""The names of the model registry, without importing torch.

Config validation (``config.py``) checks model names against this tuple so that a bad config is
rejected in well under two seconds, before torch or Ray is imported.  ``models.register_model``
refuses a name that is missing here, and a test checks that the two agree, so a new model is one
line here and its builder in ``models.py``.
"""
MODEL_NAMES: tuple[str, ...] = ("alexnet", "all_cnn_c", "convpool_cnn_c", "resnet32", "resnet50", "secnn",
                                "vgg16")

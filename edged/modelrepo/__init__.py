"""The on-disk format of a model version, shared by serving and the bundle store: the repository
layout and which version serves (``layout``: version names, ``CURRENT``), and a version's
``config.toml`` and test vectors (``config``). Nothing here loads a model."""

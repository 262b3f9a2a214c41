"""The inversion core: what every method builds on, importing no method and no plug-in.

``protocol.py`` (method, step and plug-in protocols) over ``registry.py`` (which exist); ``inversion.py`` (the
generator loop and its named extension points) with ``inversion_config.py`` (the options it reads) and
``updates.py`` (which term updates which parameters); shared pieces named for what they compute: ``losses.py``,
``hooks.py``, ``memory.py``, ``generators.py``, ``priors.py``, ``augment.py``, ``pixels.py``, ``proxy.py``.
"""

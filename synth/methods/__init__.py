"""The synthesis methods, one file each. :func:`synth.registry.discover` imports every module here; a
method registers itself by defining a :class:`synth.base.SynthesisMethod` subclass with a ``name``."""

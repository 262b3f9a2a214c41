"""The synthesis methods, one file each, or one folder when a method has helpers of its own (``kgen/``,
``diffdfkd/``). :func:`synth.core.registry.discover` imports every module and package here; a method registers
itself by defining a :class:`synth.core.protocol.SynthesisMethod` subclass with a ``name``."""

"""Loss plug-ins, one file or folder each: :func:`synth.core.registry.discover` imports every module here.

The protocol a plug-in follows is :class:`synth.core.protocol.LossPlugin`."""

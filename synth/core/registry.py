"""Which methods and loss plug-ins exist: registered on import, found by discovery.

Imports nothing of ``synth`` (the protocol imports it), so it sits at the bottom of the core.
A method registers itself by being defined (a :class:`~synth.core.protocol.SynthesisMethod` subclass with a
``name``); a loss plug-in likewise (:class:`~synth.core.protocol.LossPlugin`). :func:`discover` imports every
module in ``synth/methods/`` and ``synth/plugins/``, and every module another installed package names under
the entry-point group ``dfkd_toolkit.synth``, so adding a method is one new file and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import threading
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "dfkd_toolkit.synth"

METHODS: dict[str, type] = {}
PLUGINS: dict[str, type] = {}
_discovered = False
_discover_lock = threading.RLock()


def _same_class(a: type, b: type) -> bool:
    # A module imported twice (tests, reloads) defines a new class object for the same method.
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _check_options(owner: str, options_class: type) -> None:
    if not dataclasses.is_dataclass(options_class):
        raise TypeError(f"{owner}: its options class {options_class.__name__} must be a dataclass")
    for f in dataclasses.fields(options_class):
        if "help" not in f.metadata:
            raise TypeError(f"{owner}: option {f.name!r} has no help text (field metadata 'help')")


def register_method(cls: type) -> type:
    """Adds ``cls`` to :data:`METHODS` after checking what ``synth run`` relies on."""
    name = cls.name
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise TypeError(f"{cls.__qualname__}: method name {name!r} must be letters, digits, '-' or '_'")
    if not getattr(cls, "summary", ""):
        raise TypeError(f"method {name!r} needs a one-line `summary` for `synth list`")
    _check_options(f"method {name!r}", cls.config_class)
    budget = cls.config_class.own_cpu_budget()
    if budget is not None:
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(budget) - fields)
        if unknown:
            raise TypeError(f"method {name!r}: cpu_budget sets unknown option(s) {', '.join(unknown)}")
    existing = METHODS.get(name)
    if existing is not None and not _same_class(existing, cls):
        raise ValueError(f"method {name!r} registered twice: {existing.__module__} and {cls.__module__}")
    METHODS[name] = cls
    return cls


def register_plugin(cls: type) -> type:
    """Adds ``cls`` to :data:`PLUGINS`; its options must not clash with another plug-in's."""
    name = cls.name
    _check_options(f"plug-in {name!r}", cls.options_class)
    existing = PLUGINS.get(name)
    if existing is not None and not _same_class(existing, cls):
        raise ValueError(f"loss plug-in {name!r} registered twice: {existing.__module__} and {cls.__module__}")
    mine = {f.name for f in dataclasses.fields(cls.options_class)}
    for other_name, other in PLUGINS.items():
        if other_name == name:
            continue
        clash = mine & {f.name for f in dataclasses.fields(other.options_class)}
        if clash:
            raise ValueError(f"loss plug-ins {name!r} and {other_name!r} both define option(s) {sorted(clash)}")
    PLUGINS[name] = cls
    return cls


def _import_package_modules(package: str) -> None:
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def discover() -> None:
    """Imports the built-in method and plug-in modules and those of installed extensions (once).

    Thread-safe: a caller never sees the registries half filled (the benchmark's lanes are threads)."""
    global _discovered
    with _discover_lock:  # re-entrant: a module being imported may itself look a method up
        if _discovered:
            return
        _import_package_modules("synth.methods")
        _import_package_modules("synth.plugins")
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            entry.load()
        _discovered = True


def get_method(name: str) -> type:
    discover()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}") from None


def all_methods() -> dict[str, type]:
    discover()
    return dict(sorted(METHODS.items()))


def all_plugins() -> dict[str, type]:
    discover()
    return dict(sorted(PLUGINS.items()))

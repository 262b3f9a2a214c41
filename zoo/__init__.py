"""The model zoo: architectures, checkpoint loading, teacher cards and pixel-space classifiers.

Shared by ``synth`` (which needs the teacher) and ``distill`` (which needs students and, optionally, a
live teacher). Everything a user can get wrong raises :class:`ZooError` with a message naming the file
or name and what would fit.

* :data:`ARCHITECTURES`, :func:`build_model` -- networks the DFKD literature uses, with the public
  checkpoints' parameter names, plus ``tv:NAME`` for torchvision's ImageNet models;
* :class:`TeacherCard` -- a checkpoint's identity (architecture, classes, input size, normalisation,
  class names, sha256), stored beside it as ``X.card.json``;
* :class:`Classifier` -- network + normalisation; takes float pixels in [0, 1], NCHW;
* :func:`load_classifier`, :func:`save_classifier` -- safe (``weights_only=True``) loading of the
  common checkpoint layouts (TorchScript, which runs code, only with ``trust_torchscript=True``), atomic
  saving; :func:`matching_architectures` -- which zoo architectures a foreign state_dict fits;
* :func:`default_teacher_path`, :func:`load_default_teacher` -- the project's WRN-16-2 FMNIST-32 teacher;
* :func:`pick_device` -- ``"auto"`` picks CUDA when present; :class:`Acceleration` -- ``--precision``
  (auto | fp32 | bf16 | fp16): autocast, loss scaling for fp16 and channels_last on CUDA, resolved per device.
"""

from .architectures import ARCHITECTURES, build_model, canonical_arch
from .card import TeacherCard, card_path_for
from .classifier import Classifier
from .device import Acceleration, pick_device
from .errors import NormalizationWarning, ZooError
from .keymap import matching_architectures
from .loading import default_teacher_path, load_classifier, load_default_teacher, save_classifier

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "canonical_arch",
    "TeacherCard",
    "card_path_for",
    "Classifier",
    "load_classifier",
    "save_classifier",
    "matching_architectures",
    "default_teacher_path",
    "load_default_teacher",
    "pick_device",
    "Acceleration",
    "ZooError",
    "NormalizationWarning",
]

"""Which objective ``distill run`` trains the student with, and with which weights.

``--objective auto`` (the default) reads the method from the dataset's manifest and takes that paper's student
objective (:data:`PAPER_OBJECTIVES`), with the weights the dataset was made with; ``--objective kd`` is plain
Hinton KD for any dataset, ``ikd`` and ``kgen-ed`` the papers' objectives for any dataset that has what they
need. The run says what it chose and why, on the terminal and in ``metrics.json`` ("objective").

Two objectives stay where they were and take precedence: a set with condensed samples learns from the
condensed paper's two KD expectations (:mod:`distill.mixed`), and ``--msarc-weight`` is DiffDFKD's KD + mSARC
(:mod:`distill.msarc`); ``--objective`` then may only be ``auto`` or ``kd``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import shards
from distill.core import DistillError, Objective
from distill.mixed import SyntheticCondensedKD
from distill.objectives import IKD, EmbeddingDiversityKD, LiveTeacherKD, StoredLogitsKD, TeacherLogits

OBJECTIVES = ("auto", "kd", "ikd", "kgen-ed")
#: The student objective each method's paper trains with (methods not listed: Hinton KD).
PAPER_OBJECTIVES = {"cpsc": "ikd", "kgen": "kgen-ed", "kgen-s": "kgen-ed"}
#: Methods whose paper trains the student in a way that needs the live teacher: said with auto's choice.
LIVE_TEACHER_HINTS = {
    "diffdfkd": "its paper's KD + mSARC needs the teacher: --teacher T --msarc-weight W",
    "fast": "its paper's regime, augmented views labelled by the teacher on the fly: --teacher T",
    "cmi": "its paper's regime, augmented views labelled by the teacher on the fly: --teacher T",
}
#: Where K-Gen keeps its class representatives in a dataset (synth's ``class_embeddings.pt``).
EMBEDDINGS_ARTIFACT = "class_embeddings.pt"
DEFAULT_IKD_ALPHA = 5.0  # CPSC-DFKD: the middle of the recommended [3, 7]
DEFAULT_ED_WEIGHT = 10.0  # K-Gen Table 8: a_ed
_DESCRIBE = {
    "kd": "Hinton KD",
    "ikd": "CPSC-DFKD's L_IKD = KL + {alpha:g}·MSE on the logits",
    "kgen-ed": "K-Gen's L_S = KD + {ed_weight:g}·L_ed (class representatives from class_embeddings.pt)",
}


@dataclass
class ObjectiveOptions:
    """The student objective's options (``distill run`` builds its CLI options from these fields)."""

    objective: str = field(default="auto", metadata={
        "help": "auto: the objective of the paper of the method that made the dataset (cpsc: ikd; kgen, kgen-s: "
                "kgen-ed; others: kd), said on the terminal and in metrics.json; kd: Hinton KD; ikd: KL + "
                "alpha·L2 on logits (CPSC-DFKD); kgen-ed: KD + ed-weight·L_ed with the dataset's class embeddings "
                "(K-Gen Eq. 8-9).", "choices": OBJECTIVES})
    ikd_alpha: float | None = field(default=None, metadata={
        "help": "ikd: weight alpha of the logit L2. [default: the dataset's cpsc --ikd-l2-weight, else 5]"})
    ed_weight: float | None = field(default=None, metadata={
        "help": "kgen-ed: weight of L_ed. [default: the dataset's kgen --ed-weight, else 10]"})
    inner_radius: float | None = field(default=None, metadata={
        "help": "kgen-ed: inner radius r_i. [default: the dataset's, else half the smallest pairwise MSE of its "
                "class embeddings]"})


@dataclass(frozen=True)
class ObjectiveChoice:
    """What the student minimises: ``kind`` ("kd", "ikd", "kgen-ed", "kd-condensed", "kd-msarc"), how it was
    chosen, and its weights."""

    kind: str
    chosen_by: str  # "auto" or "--objective"
    reason: str
    weights: dict[str, Any]

    def line(self) -> str:
        """The terminal's line."""
        hint = "; --objective kd for plain KD" if self.kind in ("ikd", "kgen-ed") else ""
        return f"objective: {self.kind} ({self.reason}{hint})"


def choose_objective(options: ObjectiveOptions, manifest: dict[str, Any], *, mixed: bool, msarc: bool,
                     live: bool = False) -> ObjectiveChoice:
    """The objective for a run on ``manifest`` (pure: nothing is read beyond the manifest); ``live``: a teacher
    was given."""
    asked = options.objective
    if asked not in OBJECTIVES:
        raise DistillError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {asked!r}")
    if mixed or msarc:
        what = "the condensed set's two KD expectations" if mixed else "KD + mSARC (--msarc-weight)"
        if asked not in ("auto", "kd"):
            raise DistillError(f"--objective {asked} cannot be combined with {what}; use --objective kd or auto")
        return ObjectiveChoice("kd-condensed" if mixed else "kd-msarc", "auto" if asked == "auto" else "--objective",
                               what, {})
    method, config = _method(manifest)
    if asked == "auto":
        kind = PAPER_OBJECTIVES.get(method or "", "kd")
        reason = f"auto: the dataset was made by {method}, whose paper trains the student with it"
        if kind == "kd":
            reason = f"auto: {method or 'the method that made this dataset'} has no student objective of its own"
            if method in LIVE_TEACHER_HINTS and not live:
                reason = f"auto: Hinton KD; {LIVE_TEACHER_HINTS[method]}"
        elif kind == "kgen-ed" and not (config.get("embedding_diversity", True) and config.get("ed_weight", 1) > 0):
            kind, reason = "kd", f"auto: the dataset was made by {method} without embedding diversity"
        elif kind == "kgen-ed" and EMBEDDINGS_ARTIFACT not in (manifest.get("artifacts") or {}):
            kind, reason = "kd", (f"auto: the dataset was made by {method} but stores no {EMBEDDINGS_ARTIFACT} "
                                  "(made with --class-embedding centre), so L_ed has no class representatives")
    else:
        kind, reason = asked, f"--objective {asked}"
    weights: dict[str, Any] = {}
    if kind == "ikd":
        alpha = options.ikd_alpha
        if alpha is None:
            alpha = config.get("ikd_l2_weight", DEFAULT_IKD_ALPHA) if method == "cpsc" else DEFAULT_IKD_ALPHA
        weights["alpha"] = float(alpha)
    elif kind == "kgen-ed":
        own = method in ("kgen", "kgen-s")
        weight = options.ed_weight if options.ed_weight is not None else (
            config.get("ed_weight", DEFAULT_ED_WEIGHT) if own else DEFAULT_ED_WEIGHT)
        weights["ed_weight"] = float(weight)
        radius = options.inner_radius
        if radius is None and own and float(config.get("inner_radius", 0.0) or 0.0) > 0:
            radius = float(config["inner_radius"])
        weights["inner_radius"] = radius  # None: derived from the embeddings when they are read
    if kind in _DESCRIBE and asked == "auto" and kind != "kd":
        reason += ": " + _DESCRIBE[kind].format(**weights)
    return ObjectiveChoice(kind, "auto" if asked == "auto" else "--objective", reason, weights)


def _method(manifest: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    method = manifest.get("method")
    if not isinstance(method, dict):
        return None, {}
    config = method.get("config")
    return method.get("name"), config if isinstance(config, dict) else {}


def class_representatives(location: str, manifest: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """K-Gen's class representatives f_y stored with the dataset (L2-normalised [K, D]) and the inner radius
    derived from them (the stored one, else half the smallest pairwise MSE: K-Gen's Table 14 rule)."""
    try:
        data = shards.read_artifact(location, EMBEDDINGS_ARTIFACT, manifest=manifest)
    except shards.ShardError as error:
        raise DistillError(f"--objective kgen-ed needs K-Gen's class representatives: {error} (a dataset made by "
                           "synth run kgen/kgen-s with text embeddings holds them); use --objective kd") from None
    try:
        record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        embeddings = F.normalize(record["embeddings"].float(), dim=1)
    except Exception as error:  # a stranger's file: whatever is wrong with it, say which file
        raise DistillError(f"{location}/{EMBEDDINGS_ARTIFACT} cannot be read as class embeddings: {error}") from None
    k = int(manifest["num_classes"])
    if embeddings.dim() != 2 or embeddings.shape[0] != k:
        raise DistillError(f"{location}/{EMBEDDINGS_ARTIFACT} holds {tuple(embeddings.shape)} embeddings for a "
                           f"dataset of {k} classes")
    stored = record.get("derived_radii")
    if isinstance(stored, torch.Tensor) and stored.numel() == 2:
        return embeddings, float(stored[0])
    distances = (embeddings[:, None, :] - embeddings[None, :, :]).double().pow(2).mean(dim=-1)
    return embeddings, float(distances[~torch.eye(k, dtype=torch.bool)].min()) / 2


def build_objective(choice: ObjectiveChoice, *, location: str, manifest: dict[str, Any], student: nn.Module,
                    teacher: nn.Module | None, temperature: float, condensed_weights: tuple[float, float],
                    msarc: tuple[float, str | None]) -> Objective:
    """The objective ``choice`` names, on the student's device (``teacher`` already there, or None). An objective
    with weights resolved only here (the radius derived from the embeddings) reports them as ``weights``."""
    if choice.kind == "kd-msarc":
        from distill.msarc import MSARCKD

        assert teacher is not None
        return MSARCKD(student, teacher, temperature, msarc[0], msarc[1])
    if choice.kind == "kd-condensed":
        return SyntheticCondensedKD(temperature, *condensed_weights, teacher)
    if choice.kind == "kd":
        return LiveTeacherKD(teacher, temperature, amp=True) if teacher is not None else StoredLogitsKD(temperature)
    logits = TeacherLogits(teacher, amp=True)
    if choice.kind == "ikd":
        return IKD(logits, choice.weights["alpha"])
    representatives, derived = class_representatives(location, manifest)
    radius = choice.weights.get("inner_radius")
    return EmbeddingDiversityKD(student, logits, temperature, representatives, derived if radius is None else radius,
                                choice.weights["ed_weight"])

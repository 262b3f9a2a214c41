"""Text prompts for text-conditioned diffusion models (DiffDFKD Sec. IV-A): "a realistic photo" with one random
subject and one random style modifier per image.

The paper's prompt names no class: DiffDFKD sets NAYER aside because it uses the teacher's label names, and
gives DM-KD (which needs them) the same fixed prompts. So the default template is label-free; the teacher's
guidance alone steers each latent to its class. A template holding ``{name}`` ("a realistic photo of a
{name}") is the option that uses the class names from the teacher's card, and then needs them. Modifier lists
are ``|``-separated strings (so that a modifier may hold a comma); an empty entry means "no modifier", so a
list may leave some prompts unmodified.
"""

from __future__ import annotations

import torch

from synth.errors import SynthError


def split_modifiers(text: str) -> list[str]:
    """``"a|b||c"`` -> ``["a", "b", "", "c"]``; an empty string -> ``[""]`` (no modifier)."""
    return [part.strip() for part in text.split("|")] if text.strip() else [""]


class PromptBuilder:
    """Builds one prompt per asked label: the template (with the class name where it says ``{name}``), then a
    subject and a style."""

    def __init__(self, template: str, class_names: list[str] | None, num_classes: int, subjects: str = "",
                 styles: str = ""):
        try:
            template.format(name="x")
        except (KeyError, IndexError, ValueError) as error:
            raise SynthError(f"the prompt template {template!r} may only use the field {{name}}: {error}") from None
        self.uses_names = "{name}" in template
        if self.uses_names and not class_names:
            raise SynthError("a prompt template with {name} needs the teacher's class names: give --class-names "
                             "(comma-separated or a file) or a teacher card that lists them, or use a label-free "
                             "prompt (the paper's 'a realistic photo')")
        if self.uses_names and len(class_names or []) != num_classes:
            raise SynthError(f"{len(class_names or [])} class names for a teacher with {num_classes} classes")
        self.template = template
        self.class_names = list(class_names or [])
        self.subjects = split_modifiers(subjects)
        self.styles = split_modifiers(styles)

    def base(self, label: int) -> str:
        return self.template.format(name=self.class_names[label]) if self.uses_names else self.template

    def __call__(self, labels: list[int]) -> list[str]:
        """One prompt per label; modifiers drawn from torch's global generator (so a seed fixes them)."""
        subjects = torch.randint(len(self.subjects), (len(labels),)).tolist()
        styles = torch.randint(len(self.styles), (len(labels),)).tolist()
        prompts = []
        for label, i, j in zip(labels, subjects, styles, strict=True):
            parts = [self.base(label), self.subjects[i], self.styles[j]]
            prompts.append(", ".join(p for p in parts if p))
        return prompts

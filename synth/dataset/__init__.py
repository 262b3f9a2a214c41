"""What describes a finished dataset: its card (``card.py``), diversity figures (``diversity.py``) and the
``synth inspect`` report (``inspect.py``)."""

"""Training losses: CLIP contrastive (``contrastive.py``) and multi-teacher distillation
(``distill.py``), combined over the ground-truth and synthetic caption sets (``reinforced.py``)."""

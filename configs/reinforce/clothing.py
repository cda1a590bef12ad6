"""ImageFolder → reinforced dataset (``../shared/data/clothing/train``): class-name prompts.

GT caption = the first template filled with the class text; synthetic captions = the other
templates (``other_captions``), so distillation sees several phrasings per image.
"""
from configs.reinforce.common import SHARED, base_config, teacher
from mobileclip2_jax.data.sources import CLOTHING_CLASS_NAMES


def get_config():
    c = base_config()
    c.source.kind = "imagefolder"
    c.source.root = f"{SHARED}/clothing/train"
    c.source.class_names = dict(CLOTHING_CLASS_NAMES)
    c.teachers = [teacher("zoo", "MobileCLIP2-S4")]
    return c

"""Add one teacher to an existing reinforced dataset (stored augmentations and captions).

    python launch/reinforce.py --config configs/reinforce/add_teacher.py \\
        --config.input_dir=/data/coco_dr --config.output_dir=/data/coco_dr_plus_s4 \\
        --config.teachers[0].model=MobileCLIP2-S4 --config.teachers[0].checkpoint=/ckpt/s4

The output is a new dataset: old blocks bit-identical, the new block appended, metadata updated.
"""
from configs.reinforce.common import base_config, teacher


def get_config():
    c = base_config()
    c.mode = "add_teacher"
    c.teachers = [teacher("zoo", "MobileCLIP2-S4")]
    return c

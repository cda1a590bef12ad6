"""COCO captions → reinforced dataset; the default is ``../shared/data/coco_mini``.

GT caption = the first human caption; synthetic captions (``syn_text``) = the other four, which
is what the issue calls "the other captions of the same COCO image" (a CoCa captioner plugs in
through ``synthetic[0].kind = "python"``, see ``data/synthetic_captions.py``).

    python launch/reinforce.py --config configs/reinforce/coco_mini.py \\
        --config.output_dir=/tmp/coco_dr --config.teachers[0].checkpoint=/ckpt/mobileclip2_s4

``:smoke`` (``--config configs/reinforce/coco_mini.py:smoke``) runs here in about a minute with a
*random-init* MobileCLIP2-S0 teacher at 64 px, 3 augmentations, 32 images in 4 shards — for
checking the machinery, not for training anything useful.
"""
from configs.reinforce.common import SHARED, base_config, teacher


def get_config(arg: str = ""):
    c = base_config()
    c.source.kind = "coco"
    c.source.annotations = f"{SHARED}/coco_mini/annotations/captions_train2017.json"
    c.source.image_dir = f"{SHARED}/coco_mini/train2017"
    c.output.samples_per_shard = 20
    c.teachers = [teacher("zoo", "MobileCLIP2-S4")]
    if arg == "smoke":
        c.source.max_items = 32
        c.augmentation.num_augs = 3
        c.output.samples_per_shard = 8
        c.teachers = [teacher("zoo", "MobileCLIP2-S0", image_size=64, batch_size=16,
                              allow_random_init=True, label="MobileCLIP2-S0-random-init")]
        c.run.replay_threads = 2
        c.run.progress_every_s = 2.0
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: smoke")
    return c

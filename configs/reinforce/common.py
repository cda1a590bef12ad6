"""Shared defaults of the dataset-generation configs (``launch/reinforce.py``).

Defaults are the released recipe where one exists (RandAugment num_ops 2, magnitude 9 after a
RandomResizedCrop to 224 with scale (0.08, 1), bicubic; ``training_and_data.md`` §1.3, §4.3).
"""
import os

from ml_collections import ConfigDict, config_dict

# ../shared/data beside the repository, whatever the working directory
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      os.pardir, "shared", "data")
SHARED = os.path.normpath(SHARED)


def teacher(kind: str = "zoo", model: str = "MobileCLIP2-S4", checkpoint: str = "", **overrides) -> ConfigDict:
    t = ConfigDict({
        "kind": kind,                  # "zoo" (this project's models, JAX) | "open_clip" (PyTorch)
        "model": model,                # zoo variant, or open_clip name / "local-dir:DIR"
        "checkpoint": checkpoint,      # Orbax dir (zoo) or .pt/.safetensors file; required
        "image_size": config_dict.placeholder(int),  # None: the model's own preprocessing size
        "batch_size": 64,              # fixed teacher batch (padded), per host
        "label": "",                   # name in the metadata (default: the model name)
        "logit_scale": config_dict.placeholder(float),  # None: the teacher's learned exp(logit_scale)
        "allow_random_init": False,    # True only for smoke tests: distilling noise must be a choice
        "seed": 0,
    })
    t.update(overrides)
    return t


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.mode = "generate"                 # or "add_teacher"
    c.output_dir = ""                   # required
    c.source = ConfigDict({"kind": "coco", "annotations": "", "image_dir": "", "root": "",
                           "templates": (), "class_names": {}, "pattern": "", "max_items": 0})
    c.input_dir = ""                    # add_teacher: the existing dataset
    c.image_shards = ""                 # add_teacher: its image shards, if the dataset is image-less
    c.synthetic = [ConfigDict({"kind": "other_captions", "key": "syn_text", "json_path": "",
                               "templates": (), "factory": "", "options": {},
                               "max_per_image": 0})]
    c.augmentation = ConfigDict({"num_augs": 10, "seed": 0, "crop_size": 224, "scale": (0.08, 1.0),
                                 "ratio": (3.0 / 4.0, 4.0 / 3.0), "num_ops": 2, "magnitude": 9,
                                 "num_magnitude_bins": 31, "randaugment_p": 1.0,
                                 "interpolation": "bicubic"})
    c.teachers = [teacher()]
    c.output = ConfigDict({"samples_per_shard": 1000, "embedding_format": "npz",
                           "text_emb_layout": "dfndr", "gt_captions": "first", "store_images": True,
                           "arrayrecord_dir": ""})
    c.run = ConfigDict({"replay_threads": 8, "chunk_records": 16, "max_bad_fraction": 0.5,
                        "progress_every_s": 10.0,
                        # multi-host: jax.distributed.initialize(); empty address = auto-detect
                        # (TPU pods, Slurm); process i then makes shards i mod n
                        "distributed": False, "coordinator_address": "",
                        "num_processes": config_dict.placeholder(int),
                        "process_id": config_dict.placeholder(int)})
    return c

"""Inputs for the dataset-generator tests: a COCO subset, teacher checkpoints, configs.

* :func:`coco_subset` copies ``n`` real images of ``shared/data/coco_mini`` with their captions
  into a new COCO-format directory, optionally corrupting some image files;
* :func:`zoo_checkpoint` saves a random-init MobileCLIP2-S0 as an Orbax checkpoint — the teacher
  is then loaded exactly as a user's trained teacher would be (``create_model(pretrained=dir)``);
* :func:`open_clip_dir` writes a tiny open_clip ViT (``open_clip_config.json`` +
  ``open_clip_model.safetensors``) for the PyTorch teacher path (``local-dir:``);
* :func:`make_config` is the real ``configs/reinforce/common.py`` config with test sizes.
"""
import json
import os
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco_mini"
TEACHER_SIZE = 64
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # configs/ is imported as a package, as launch/ does


def coco_subset(out_dir, n, corrupt=None, missing=()):
    """First ``n`` COCO images (+ captions) under ``out_dir``; ``corrupt``: {index: bytes-edit}."""
    with open(COCO / "annotations" / "captions_train2017.json", encoding="utf-8") as f:
        data = json.load(f)
    images = data["images"][:n]
    ids = {im["id"] for im in images}
    out = pathlib.Path(out_dir)
    (out / "train2017").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    for i, im in enumerate(images):
        dst = out / "train2017" / im["file_name"]
        if i in missing:
            continue
        shutil.copyfile(COCO / "train2017" / im["file_name"], dst)
        if corrupt and i in corrupt:
            dst.write_bytes(corrupt[i](dst.read_bytes()))
    sub = {"images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    ann = out / "annotations" / "captions.json"
    ann.write_text(json.dumps(sub))
    return str(ann), str(out / "train2017"), images


def zoo_checkpoint(out_dir, seed=0):
    from mobileclip2_jax.factory import create_model
    model = create_model("MobileCLIP2-S0", seed=seed)
    model.save(out_dir)
    return str(out_dir)


def open_clip_dir(out_dir, seed=0):
    """A 2-layer ViT / 2-layer text open_clip CLIP at 32 px, random weights, as ``local-dir``."""
    from mobileclip2_jax.convert.torch_env import ensure_torchvision_importable
    ensure_torchvision_importable()
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file
    cfg = {"model_cfg": {"embed_dim": 32,
                         "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                        "head_width": 32},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                      "layers": 2}},
           "preprocess_cfg": {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                              "resize_mode": "shortest"}}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump(cfg, f)
    torch.manual_seed(seed)
    model = CLIP(**cfg["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, "open_clip_model.safetensors"))
    return str(out_dir)


def make_config(output_dir, annotations, image_dir, checkpoint, *, num_augs=2, per_shard=4, **overrides):
    from configs.reinforce.common import base_config, teacher
    c = base_config()
    c.output_dir = str(output_dir)
    c.source.annotations, c.source.image_dir = annotations, image_dir
    c.augmentation.num_augs = num_augs
    c.output.samples_per_shard = per_shard
    c.teachers = [teacher("zoo", "MobileCLIP2-S0", checkpoint, image_size=TEACHER_SIZE, batch_size=8,
                          label="s0-test")]
    c.run.replay_threads = 2
    c.run.chunk_records = 2
    c.run.progress_every_s = 0.0
    for k, v in overrides.items():
        holder, _, name = k.rpartition(".")
        target = c
        for part in filter(None, holder.split(".")):
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        setattr(target, name, v)
    return c


def config_flags_for(config):
    """``--config.*`` overrides reproducing :func:`make_config`'s values on the command line."""
    t = config.teachers[0]
    return [f"--config.output_dir={config.output_dir}",
            f"--config.source.annotations={config.source.annotations}",
            f"--config.source.image_dir={config.source.image_dir}",
            f"--config.augmentation.num_augs={config.augmentation.num_augs}",
            f"--config.output.samples_per_shard={config.output.samples_per_shard}",
            "--config.teachers[0].model=MobileCLIP2-S0", f"--config.teachers[0].checkpoint={t.checkpoint}",
            f"--config.teachers[0].image_size={t.image_size}", f"--config.teachers[0].batch_size={t.batch_size}",
            f"--config.teachers[0].label={t.label}", "--config.run.replay_threads=2",
            "--config.run.chunk_records=2", "--config.run.progress_every_s=0"]


def make_captioner(options):
    """A stand-in captioning model for the ``python`` synthetic-caption slot (see
    ``data/synthetic_captions.py``): describes the decoded image it is given."""
    style = options.get("style", "photo")

    def caption(image, item):
        return [f"a {style} of {image.width} by {image.height} pixels", f"{item.extra['class_text']} item"]
    return caption

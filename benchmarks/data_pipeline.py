"""Data-pipeline throughput per core: decode + replay + tokenize, this project vs torchvision.

    python benchmarks/data_pipeline.py [--images 80] [--n-aug 30] [--size 256] [--reps 3]
                                       [--workers 2]

Builds a DataCompDR-shaped reinforced set from the real COCO photos in ``../shared/data/coco_mini``
(original JPEG bytes, 30 stored augmentations per image sampled as the released generator does,
5 synthetic captions = the other COCO captions, two 768-d "teachers" of random unit vectors —
embedding *values* do not affect speed, their size does), then processes every record, in one
thread on one core, through:

* **jax-project**: ``pipeline.ProcessRecord`` — what each Grain worker runs: read the record's
  bytes from the shard, decode + validate it (JSON, npz, dims, finiteness), sample the view and
  captions, decode the JPEG, replay the stored crop + RandAugment ops, normalize, tokenize both
  captions with the CLIP BPE tokenizer;
* **torchvision**: the reference's steps on the same bytes (v2 patch ``preprocess_dr``): PIL
  decode as ``pilrgba`` → RGB, ``json``/``np.load`` of the members, ``F.resized_crop`` +
  ``autoaugment._apply_op`` per stored op, ``F.to_tensor`` + ``F.normalize``, open_clip's
  tokenizer on both captions, embeddings as torch tensors.

Both run single-threaded (``torch.set_num_threads(1)``), alternating rep by rep; samples/s is
the median. ``--workers N`` also times the whole Grain pipeline (N worker processes, batches of
32) for the end-to-end rate of this machine. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"


def build_dataset(directory: str, n_images: int, n_aug: int, dims=(768, 768), seed: int = 0):
    from mobileclip2_jax.data.aug_sampling import AugSamplingConfig, sample_aug_params_list
    from mobileclip2_jax.data.records import DatasetMetadata, ReinforcedRecord, Teacher
    from mobileclip2_jax.data.sources import CocoCaptionsSource
    from mobileclip2_jax.data.webdataset import write_dataset
    from PIL import Image
    src = CocoCaptionsSource(DATA / "annotations" / "captions_train2017.json", DATA / "train2017")
    rng = np.random.default_rng(seed)

    def unit(rows):
        parts = [rng.standard_normal((rows, d)).astype(np.float32) for d in dims]
        return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], 1)

    records = []
    for i in range(n_images):
        item = src[i % len(src)]
        w, h = Image.open(io.BytesIO(item.image)).size
        caps = item.captions
        records.append(ReinforcedRecord(
            key=f"{i:06d}", captions=[caps[0]], syn_texts={"syn_text": caps[1:6]},
            param_aug=sample_aug_params_list(rng, w, h, n_aug, AugSamplingConfig()),
            image_emb=unit(n_aug), text_emb=unit(1 + len(caps[1:6])), image=item.image,
            extra={"uid": f"{i:06d}"}))
    meta = DatasetMetadata(teachers=tuple(Teacher(f"teacher-{k}", d, 100.0)
                                          for k, d in enumerate(dims)))
    write_dataset(records, directory, meta, records_per_shard=max(1, n_images // 4))
    return meta


class TorchvisionReference:
    """The reference trainer's per-sample work (``preprocess_dr``) with torchvision + open_clip."""

    def __init__(self, size, mean, std, seed=0):
        from mobileclip2_jax.convert.torch_env import ensure_torchvision_importable
        ensure_torchvision_importable()
        import open_clip
        import torch
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode, autoaugment
        from mobileclip2_jax.data.augment import OP_NAMES
        self.torch, self.F, self.aa, self.IM, self.ops = torch, F, autoaugment, InterpolationMode, OP_NAMES
        self.tokenizer = open_clip.get_tokenizer("MobileCLIP2-S0")
        self.size, self.mean, self.std = size, list(mean), list(std)
        self.rng = np.random.RandomState(seed)

    def __call__(self, raw):
        from PIL import Image
        torch, F = self.torch, self.F
        img = Image.open(io.BytesIO(raw["jpg"]))
        img = img.convert("RGBA").convert("RGB")                          # pilrgba → RGB
        text = raw["txt"].decode("utf-8")
        syn = json.loads(raw["syn.json"])
        paug = json.loads(raw["paug.json"])["param_aug"]
        embs = {k: torch.from_numpy(v) for k, v in np.load(io.BytesIO(raw["npz"])).items()}
        a = self.rng.randint(len(paug))
        key = "syn_text"
        s = self.rng.randint(len(syn[key]))
        (i, j, h, w), ops = paug[a]
        img = F.resized_crop(img, i, j, h, w, [self.size, self.size], self.IM.BICUBIC)
        for op, mag in ops or ():
            img = self.aa._apply_op(img, self.ops[op], mag, interpolation=self.IM.NEAREST, fill=None)
        x = F.normalize(F.to_tensor(img), self.mean, self.std)
        tokens = self.tokenizer([text, syn[key][s]])
        return (x, tokens, embs["image_emb"][a].float(), embs["text_emb"][0].float(),
                embs["text_emb"][1 + s].float())


def time_all(fn, items):
    t = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=80)
    p.add_argument("--n-aug", type=int, default=30)
    p.add_argument("--size", type=int, default=256, help="student image size (MobileCLIP2-S0: 256)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="0 skips the end-to-end Grain timing")
    args = p.parse_args()
    if not DATA.exists():
        print(f"data_pipeline: {DATA} not found (the shared sample data)", file=sys.stderr)
        return 2
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import torch
    torch.set_num_threads(1)
    from mobileclip2_jax.data.pipeline import PipelineConfig, ProcessRecord, ReinforcedPipeline
    from mobileclip2_jax.data.preprocess import PreprocessConfig
    from mobileclip2_jax.data.webdataset import WebDatasetSource
    from mobileclip2_jax.tokenizers.clip_bpe import ClipBpeTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_dataset(tmp, args.images, args.n_aug)
        print(f"[build] {args.images} records × {args.n_aug} augs in {time.perf_counter() - t0:.1f}s")
        source = WebDatasetSource(tmp)
        pre = PreprocessConfig(args.size)  # MobileCLIP2-S0's preprocessing: raw [0, 1] pixels
        config = PipelineConfig(global_batch_size=32, preprocess=pre)
        ours = ProcessRecord(source, config, ClipBpeTokenizer())
        ref = TorchvisionReference(args.size, pre.mean, pre.std)
        items = [(i, 0) for i in range(len(source))]
        raws = [source[i] for i in range(len(source))]     # the reference gets the bytes for free
        for x in items[:4]:
            assert "__bad_sample__" not in ours(x)
        ref(raws[0])
        rates = {"jax-project": [], "torchvision": []}
        for rep in range(args.reps):
            rates["jax-project"].append(time_all(ours, items))
            rates["torchvision"].append(time_all(ref, raws))
            print(f"[rep {rep}] jax-project {rates['jax-project'][-1]:.1f}/s  "
                  f"torchvision {rates['torchvision'][-1]:.1f}/s", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        result = {"benchmark": "data_pipeline", "images": args.images, "n_aug": args.n_aug,
                  "size": args.size, "teacher_dims": [768, 768],
                  "jax_project_samples_per_s_per_core": round(med["jax-project"], 2),
                  "torchvision_samples_per_s_per_core": round(med["torchvision"], 2),
                  "ratio": round(med["jax-project"] / med["torchvision"], 3),
                  "reps": {k: [round(r, 2) for r in v] for k, v in rates.items()}}
        if args.workers:
            cfg = PipelineConfig(global_batch_size=32, preprocess=pre, num_workers=args.workers)
            it = ReinforcedPipeline(source, cfg, ClipBpeTokenizer()).host_iterator()
            next(it)  # workers started and warm
            t = time.perf_counter()
            n_batches = 6
            for _ in range(n_batches):
                next(it)
            result["grain_workers"] = args.workers
            result["grain_end_to_end_samples_per_s"] = round(32 * n_batches / (time.perf_counter() - t), 2)
            it.close()
        print(f"per core: jax-project {med['jax-project']:.1f} samples/s, torchvision "
              f"{med['torchvision']:.1f} samples/s → {result['ratio']:.2f}×")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

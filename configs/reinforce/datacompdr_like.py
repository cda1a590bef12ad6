"""The DataCompDR recipe on your own image+caption webdataset shards (img2dataset layout).

Teachers: the two open_clip ViT-L-14 models of DataCompDR (``datacomp_xl_s13b_b90k`` and
``openai``), run through PyTorch; 30 augmentations per image; bf16 ``pth.gz`` embeddings in the
legacy layout (GT + synthetic rows in ``text_emb``); image-less output (the images stay in the
source shards and are joined by key at training, as DataCompDR ships). Synthetic captions come
from a JSON of key → captions produced by a captioner run (``synthetic[0].json_path``).

    python launch/reinforce.py --config configs/reinforce/datacompdr_like.py \\
        --config.source.pattern='/data/dc/{00000000..00001023}.tar' \\
        --config.synthetic[0].json_path=/data/dc/coca_captions.json \\
        --config.teachers[0].checkpoint=/ckpt/ViT-L-14_datacomp_xl.bin \\
        --config.teachers[1].checkpoint=/ckpt/ViT-L-14_openai.bin \\
        --config.output_dir=/data/dcdr --config.run.distributed=True   # on every host
"""
from configs.reinforce.common import base_config, teacher


def get_config():
    c = base_config()
    c.source.kind = "tar"
    c.synthetic[0].kind = "json"
    c.augmentation.num_augs = 30
    c.teachers = [teacher("open_clip", "ViT-L-14", label="ViT-L-14:datacomp_xl_s13b_b90k", batch_size=256),
                  teacher("open_clip", "ViT-L-14", label="ViT-L-14:openai", batch_size=256)]
    c.output.embedding_format = "pth.gz"
    c.output.text_emb_layout = "datacompdr"
    c.output.store_images = False
    c.output.samples_per_shard = 10000
    return c

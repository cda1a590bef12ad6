"""A model export as an Orbax checkpoint directory, loadable by ``create_model_and_transforms``.

Layout of ``DIR``::

    DIR/mobileclip2_jax.json   {"model": "MobileCLIP2-S0", "inference_mode": false, ...}
    DIR/variables/             Orbax StandardCheckpointer tree {"params", "batch_stats"}

The JSON makes the directory self-describing, so loading it under another variant's name is
an error naming both, not a shape mismatch deep in Orbax. Saving never overwrites an existing
checkpoint unless asked to.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Dict, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

METADATA_FILE = "mobileclip2_jax.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1


def is_model_checkpoint(path: "str | pathlib.Path") -> bool:
    return (pathlib.Path(path) / METADATA_FILE).is_file()


def save_variables(directory: "str | pathlib.Path", variables: Mapping[str, Any], metadata: Dict[str, Any],
                   overwrite: bool = False) -> pathlib.Path:
    directory = pathlib.Path(directory).absolute()
    target = directory / VARIABLES_DIR
    if target.exists() and not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint; pass overwrite=True to "
                              f"replace it")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, jax.tree.map(np.asarray, dict(variables)), force=overwrite)
        ckptr.wait_until_finished()
    meta = dict(metadata, format_version=FORMAT_VERSION)
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_metadata(directory: "str | pathlib.Path") -> Dict[str, Any]:
    path = pathlib.Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a mobileclip2_jax model checkpoint: no "
                                f"{METADATA_FILE} (expected a directory written by model.save())")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if "model" not in meta:
        raise ValueError(f"{path}: missing key 'model' (the variant name)")
    return meta


def load_variables(directory: "str | pathlib.Path", abstract_variables: Mapping[str, Any]) -> Dict[str, Any]:
    """Restores the variables into the structure/shapes of ``abstract_variables``."""
    target = pathlib.Path(directory).absolute() / VARIABLES_DIR
    if not target.exists():
        raise FileNotFoundError(f"{directory}: no {VARIABLES_DIR}/ directory with the weights")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(target, dict(abstract_variables))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{target}: stored variables do not match the model's structure: {e}") from e

"""Strict, table-driven mapping between PyTorch state_dicts and Flax variables.

A *key table* is an explicit list of :class:`KeyEntry` rows, one per tensor, built per module
type (see ``mci_layout.py``). This module owns every layout transform:

==================  ===========================  ======================
transform           PyTorch                      Flax
==================  ===========================  ======================
``conv``            OIHW ``[O, I/g, kh, kw]``     HWIO ``[kh, kw, I/g, O]``
``linear``          ``[out, in]``                ``[in, out]``
``conv1x1_linear``  ``[out, in, 1, 1]``          ``[in, out]`` (SE fcs as Dense)
``layer_scale``     ``[C, 1, 1]``                ``[C]``
``vector``          any                          same
==================  ===========================  ======================

BatchNorm ``running_mean``/``running_var`` live in the ``batch_stats`` collection;
``num_batches_tracked`` is dropped on import (it only matters for ``momentum=None``, which no
reference model uses) and written as ``0`` on export so the result loads with
``strict=True``. Loading is strict: missing, unexpected and mis-shaped keys are collected and
reported together.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

TRANSFORMS = ("conv", "linear", "conv1x1_linear", "layer_scale", "vector")


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    collection: str            # "params" | "batch_stats"
    flax_path: Tuple[str, ...]
    torch_key: str
    transform: str

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} for {self.torch_key}")


# Row builders for the module types every tower shares; tower-specific tables live in
# ``mci_layout.py``, ``text_layout.py`` and ``vit_layout.py``.
Path = Tuple[str, ...]


def batchnorm_keys(fp: Path, tp: str) -> List[KeyEntry]:
    return [KeyEntry("params", fp + ("scale",), f"{tp}.weight", "vector"),
            KeyEntry("params", fp + ("bias",), f"{tp}.bias", "vector"),
            KeyEntry("batch_stats", fp + ("mean",), f"{tp}.running_mean", "vector"),
            KeyEntry("batch_stats", fp + ("var",), f"{tp}.running_var", "vector")]


def layernorm_keys(fp: Path, tp: str) -> List[KeyEntry]:
    return [KeyEntry("params", fp + ("scale",), f"{tp}.weight", "vector"),
            KeyEntry("params", fp + ("bias",), f"{tp}.bias", "vector")]


def conv_keys(fp: Path, tp: str, bias: bool) -> List[KeyEntry]:
    rows = [KeyEntry("params", fp + ("kernel",), f"{tp}.weight", "conv")]
    if bias:
        rows.append(KeyEntry("params", fp + ("bias",), f"{tp}.bias", "vector"))
    return rows


def linear_keys(fp: Path, tp: str, bias: bool = True, transform: str = "linear") -> List[KeyEntry]:
    rows = [KeyEntry("params", fp + ("kernel",), f"{tp}.weight", transform)]
    if bias:
        rows.append(KeyEntry("params", fp + ("bias",), f"{tp}.bias", "vector"))
    return rows



class StateDictMismatchError(ValueError):
    """Raised when a state_dict does not match the key table of the target model."""


def to_flax_layout(value: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if transform == "linear":
        return np.transpose(value)
    if transform == "conv1x1_linear":
        return np.transpose(value[:, :, 0, 0])
    if transform == "layer_scale":
        return value.reshape(value.shape[0])
    return value


def to_torch_layout(value: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    if transform == "linear":
        return np.transpose(value)
    if transform == "conv1x1_linear":
        return np.transpose(value)[:, :, None, None]
    if transform == "layer_scale":
        return value.reshape(value.shape[0], 1, 1)
    return value


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def normalize_state_dict(obj: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Unwraps ``{"state_dict": ...}``, strips ``module.`` prefixes, converts to numpy."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict mapping, got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    out = {}
    for k, v in obj.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = _to_numpy(v)
    return out


def detect_prefix(keys: Iterable[str], candidates: Sequence[str], probe: str) -> str:
    """The first candidate prefix under which ``probe`` (a key suffix) exists."""
    keys = set(keys)
    for p in candidates:
        if any(k.startswith(p + probe) for k in keys):
            return p
    return ""


def _format_list(title: str, items: List[str], limit: int = 10) -> str:
    head = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {head}{more}"


def _set_path(tree: Dict, path: Tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: Tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _flat_paths(tree: Mapping, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_paths(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def state_dict_to_variables(
    state_dict: Mapping[str, Any],
    table: Sequence[KeyEntry],
    expected_shapes: Optional[Mapping[str, Mapping]] = None,
    prefix: str = "",
    what: str = "model",
) -> Dict[str, Dict]:
    """PyTorch state_dict → Flax variables, strictly.

    ``expected_shapes`` is the abstract variables tree of the target module (e.g. from
    ``jax.eval_shape(module.init, ...)``); every converted tensor is checked against it.
    Keys outside ``prefix`` are ignored (so an open_clip checkpoint can feed its image tower).
    """
    sd = normalize_state_dict(state_dict)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    wanted = {e.torch_key: e for e in table}
    missing = [k for k in wanted if k not in sd]
    unexpected = [k for k in sd if k not in wanted and not k.endswith("num_batches_tracked")]
    mismatched, variables = [], {}
    for key, entry in wanted.items():
        if key not in sd:
            continue
        value = sd[key]
        try:
            value = to_flax_layout(value, entry.transform)
        except (ValueError, IndexError) as e:
            mismatched.append(f"{prefix}{key}: torch shape {tuple(sd[key].shape)} cannot take "
                              f"transform {entry.transform} ({e})")
            continue
        if expected_shapes is not None:
            try:
                exp = tuple(_get_path(expected_shapes[entry.collection], entry.flax_path).shape)
            except KeyError:
                exp = None
            if exp is not None and tuple(value.shape) != exp:
                torch_exp = to_torch_layout(np.empty(exp, np.int8), entry.transform).shape
                mismatched.append(f"{prefix}{key}: got {tuple(sd[key].shape)}, expected "
                                  f"{tuple(torch_exp)}")
                continue
        _set_path(variables.setdefault(entry.collection, {}), entry.flax_path,
                  np.array(value, dtype=np.float32 if value.dtype.kind == "f" else value.dtype))
    if missing or unexpected or mismatched:
        parts = [f"state_dict does not match {what}"
                 + (f" (keys read under prefix {prefix!r})" if prefix else "") + ":"]
        if mismatched:
            parts.append(_format_list("mis-shaped keys", mismatched))
        if missing:
            parts.append(_format_list("missing keys", [prefix + k for k in missing]))
        if unexpected:
            parts.append(_format_list("unexpected keys", [prefix + k for k in unexpected]))
        raise StateDictMismatchError("\n".join(parts))
    return variables


def variables_to_state_dict(
    variables: Mapping[str, Mapping],
    table: Sequence[KeyEntry],
    prefix: str = "",
    what: str = "model",
) -> Dict[str, np.ndarray]:
    """Flax variables → PyTorch state_dict (numpy arrays), strictly.

    Every table row must be present in ``variables`` and every variable must be consumed by
    the table, so nothing is silently dropped. A ``num_batches_tracked`` (int64 0) is added
    for every BatchNorm.
    """
    flat = {(c,) + p: v for c in variables for p, v in _flat_paths(variables[c]).items()}
    used, missing, out = set(), [], {}
    for e in table:
        path = (e.collection,) + e.flax_path
        if path not in flat:
            missing.append("/".join(path))
            continue
        used.add(path)
        value = to_torch_layout(np.asarray(flat[path]), e.transform)
        # (np.ascontiguousarray would turn a 0-d logit_scale into shape (1,))
        out[prefix + e.torch_key] = np.array(value, order="C", copy=True)
        if e.torch_key.endswith(".running_var"):
            out[prefix + e.torch_key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    extra = ["/".join(p) for p in flat if p not in used]
    if missing or extra:
        parts = [f"variables do not match {what}:"]
        if missing:
            parts.append(_format_list("missing variables", missing))
        if extra:
            parts.append(_format_list("variables with no PyTorch key", extra))
        raise StateDictMismatchError("\n".join(parts))
    return out

"""The torch-free ``torch.save`` reader/writer (``data/torch_pickle.py``) for ``pth.gz`` embeddings.

What is checked: bf16 rounding equals torch's / ml_dtypes' (round to nearest even, NaN kept);
our writer's output reads back here and in ``torch.load(weights_only=True)`` with equal values and
dtypes; real ``torch.save`` output (zip and legacy layouts, bf16/fp32/fp16/int64, non-contiguous
and offset views sharing one storage) reads back equal; pickles naming any other global are
refused by name *without executing anything*; crafted out-of-bounds views and corrupt files fail
with clear errors.
"""
import argparse
import collections
import gzip
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conftest import requires_torch
from mobileclip2_jax.data import torch_pickle as tp

SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-40, -3e-39,
                     3.4028235e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 65504.0, 1e-7], np.float32)


def _random_f32(n=4096, seed=0):
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-6, 6, n)
    return np.concatenate([SPECIALS, (rng.standard_normal(n) * scale).astype(np.float32)])


def _at(value):
    return int(np.flatnonzero(SPECIALS == np.float32(value))[0])


def _repack(data: bytes, fn):
    """Rebuilds a zip-layout torch file with ``fn(name, bytes) -> bytes`` applied to its records."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    prefix = zf.namelist()[0].split("/")[0]
    return tp._zip_records([(n.split("/", 1)[1], fn(n.split("/", 1)[1], zf.read(n)))
                            for n in zf.namelist()], prefix)


def _marker_payload(marker, module="os", name="system"):
    """A protocol-2 pickle calling ``module.name(<cmd>)``, which would create ``marker``."""
    arg = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w').write('x')"
    arg = arg.encode()
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(X" + struct.pack("<I", len(arg))
            + arg + b"tR.")


def _legacy_stream(main_pickle: bytes) -> bytes:
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        tp._MAGIC_NUMBER, tp._LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True}))
    return head + main_pickle + pickle.dumps([], protocol=2)


# ----------------------------------------------------------------------------- bf16
def test_bf16_rounding_is_nearest_even_and_keeps_nan():
    x = _random_f32()
    bits = tp.float32_to_bfloat16_bits(x)
    want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(bits[finite], want[finite])
    assert np.isnan(tp.bfloat16_bits_to_float32(bits[~finite])).all()
    assert bits[_at(1.0 + 2 ** -8)] == 0x3F80  # tie → even
    assert bits[_at(1.0 + 3 * 2 ** -8)] == 0x3F82  # tie → even (up)
    assert bits[_at(3.4028235e38)] == 0x7F80  # rounds to +inf, as torch
    back = tp.to_bfloat16(x)
    np.testing.assert_array_equal(back[finite], want[finite].view(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(tp.to_bfloat16(back), back)  # idempotent


@requires_torch
def test_bf16_rounding_equals_torch():
    import torch
    x = _random_f32(seed=1)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = tp.float32_to_bfloat16_bits(x)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[finite], want[finite])


# ----------------------------------------------------------------------------- round trips
def _tensors():
    rng = np.random.default_rng(2)
    return collections.OrderedDict(
        image_emb=rng.standard_normal((30, 16)).astype(np.float32),
        half=rng.standard_normal((3, 5)).astype(np.float16),
        ids=np.arange(-3, 9, dtype=np.int64).reshape(3, 4) * (2 ** 40),
        flags=np.array([True, False, True]),
        scalar=np.float64(2.5) * np.ones((), np.float64),
        empty=np.zeros((0, 16), np.float32),
        bf=_random_f32(64, seed=3)[:64].astype(ml_dtypes.bfloat16).reshape(8, 8),
        strided=rng.standard_normal((6, 7)).astype(np.float32)[1:, ::2])


def test_dump_and_load_without_torch():
    t = _tensors()
    for bfloat16 in (False, True):
        data = tp.dump_pth_gz(t, bfloat16=bfloat16)
        assert data == tp.dump_pth_gz(t, bfloat16=bfloat16)  # deterministic (gzip mtime 0)
        back = tp.load_pth_gz(data)
        assert list(back) == list(t)
        for k, v in t.items():
            if v.dtype.name == "bfloat16" or (bfloat16 and v.dtype.kind == "f"):
                want = tp.to_bfloat16(np.asarray(v, np.float32))
                assert back[k].dtype == np.float32
                np.testing.assert_array_equal(back[k], want)
            else:
                assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
                np.testing.assert_array_equal(back[k], v)
        kept = tp.load_pth_gz(data, upcast_bf16=False)
        assert kept["bf"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(kept["bf"].view(np.uint16), t["bf"].view(np.uint16))
    assert tp.load_torch(tp.dump_torch({})) == {}
    with pytest.raises(TypeError, match="dtype"):
        tp.dump_torch({"c": np.zeros(2, np.complex64)})


@requires_torch
def test_torch_load_weights_only_reads_our_files():
    import torch
    t = _tensors()
    for bfloat16 in (False, True):
        got = torch.load(io.BytesIO(tp.dump_torch(t, bfloat16=bfloat16)), weights_only=True)
        assert isinstance(got, dict) and list(got) == list(t)
        for k, v in t.items():
            g = got[k]
            if v.dtype.name == "bfloat16" or (bfloat16 and v.dtype.kind == "f"):
                assert g.dtype == torch.bfloat16, k
                np.testing.assert_array_equal(g.float().numpy(), tp.to_bfloat16(np.asarray(v, np.float32)))
            else:
                assert g.dtype == {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                                   np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool,
                                   np.dtype(np.float64): torch.float64}[v.dtype], k
                np.testing.assert_array_equal(g.numpy(), v)
            assert tuple(g.shape) == v.shape and not g.requires_grad


@requires_torch
@pytest.mark.parametrize("zip_layout", [True, False])
def test_load_torch_reads_real_torch_save(zip_layout):
    import torch
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    tensors = {
        "fp32": base,
        "bf16": base.to(torch.bfloat16),
        "fp16": base.half()[::2],
        "int64": torch.arange(-50, 50, dtype=torch.int64).reshape(10, 10) * (2 ** 35),
        "view": base[1:, ::2],            # non-contiguous, offset, same storage as fp32
        "row": base[3],                   # offset view
        "t": base.t(),                    # transposed strides
        "bf16_view": base.to(torch.bfloat16)[2:, 1::3],
        "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    buf = io.BytesIO()
    torch.save(tensors, buf, _use_new_zipfile_serialization=zip_layout)
    raw = buf.getvalue()
    assert (raw[:4] == b"PK\x03\x04") == zip_layout
    for data, loader in ((raw, tp.load_torch), (gzip.compress(raw), tp.load_pth_gz)):
        got = loader(data)
        assert list(got) == list(tensors)
        for k, v in tensors.items():
            want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            assert got[k].shape == tuple(v.shape) and got[k].dtype == want.dtype, k
            np.testing.assert_array_equal(got[k], want)
    kept = tp.load_torch(raw, upcast_bf16=False)
    np.testing.assert_array_equal(kept["bf16"].view(np.uint16),
                                  tensors["bf16"].view(torch.int16).numpy().view(np.uint16))


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("posix", "system"),
                                         ("subprocess", "Popen"), ("torch", "load")])
def test_foreign_globals_are_refused_and_nothing_runs(tmp_path, module, name):
    marker = tmp_path / f"pwned_{module}_{name}"
    payload = _marker_payload(marker, module, name)
    zip_file = tp._zip_records([("data.pkl", payload), ("byteorder", b"little")])
    for data, loader in ((zip_file, tp.load_torch), (gzip.compress(zip_file), tp.load_pth_gz),
                         (_legacy_stream(payload), tp.load_torch)):
        with pytest.raises(tp.UnsafePickleError, match=f"'{module}.{name}'"):
            loader(data)
    assert not marker.exists()
    if module == "os":  # the payload is real: plain pickle would have run it
        pickle.loads(payload)
        assert marker.exists()


def test_foreign_global_inside_an_otherwise_valid_file(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = tp.dump_torch({"image_emb": np.ones((2, 4), np.float32)})
    evil = pickle.dumps({"image_emb": 1, "meta": Evil()}, protocol=4)  # STACK_GLOBAL opcode
    data = _repack(data, lambda n, b: evil if n == "data.pkl" else b)
    with pytest.raises(tp.UnsafePickleError, match=f"{os.system.__module__}.system"):
        tp.load_torch(data)
    assert not marker.exists()
    # an argparse.Namespace, as in checkpoints that pickle their args
    ns = pickle.dumps({"args": argparse.Namespace(lr=1e-3)}, protocol=2)
    with pytest.raises(tp.UnsafePickleError, match="argparse.Namespace"):
        tp.load_torch(_repack(data, lambda n, b: ns if n == "data.pkl" else b))


@requires_torch
def test_torch_save_of_a_namespace_is_refused():
    import torch
    buf = io.BytesIO()
    torch.save({"emb": torch.ones(2), "args": argparse.Namespace(lr=1e-3)}, buf)
    with pytest.raises(tp.UnsafePickleError, match="argparse.Namespace"):
        tp.load_pth_gz(gzip.compress(buf.getvalue()))


def test_crafted_views_and_corrupt_files_fail_clearly():
    good = tp.dump_torch({"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    np.testing.assert_array_equal(tp.load_torch(good)["x"], np.arange(6).reshape(2, 3))
    shape, stride = tp._p_tuple((2, 3)), tp._p_tuple((3, 1))

    def patched(old, new):
        def fn(name, b):
            if name != "data.pkl":
                return b
            assert b.count(old) == 1
            return b.replace(old, new)
        return _repack(good, fn)

    for data, match in [
        (patched(shape, tp._p_tuple((2, 30))), "reaches element"),          # size past the storage
        (patched(stride, tp._p_tuple((3, 100))), "reaches element"),        # stride past the storage
        (patched(b"Q" + tp._p_int(0), b"Q" + tp._p_int(5)), "reaches element"),  # offset past it
        (patched(shape, tp._p_tuple((2,))), "differ in rank"),
        (patched(b"Q" + tp._p_int(0), b"Q" + tp._p_int(2 ** 40)), "reaches element"),
        (_repack(good, lambda n, b: b[:10] if n == "data/0" else b), "truncated"),
        (patched(tp._p_str("0") + tp._p_str("cpu"), tp._p_str("9") + tp._p_str("cpu")), "missing"),
        (good[:len(good) // 2], "corrupt"),
        (b"\x80\x02K\x05.", "magic"),
        (b"garbage that is not a pickle", "corrupt|magic"),
    ]:
        with pytest.raises(tp.TorchFileError, match=match):
            tp.load_torch(data)
    with pytest.raises(tp.TorchFileError, match="gzip"):
        tp.load_pth_gz(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(tp.TorchFileError, match="gzip"):
        tp.load_pth_gz(gzip.compress(good)[:-20])

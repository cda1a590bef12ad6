"""Tar shards as random-access record spans: header scan, byte-span index, positional reads.

Split from :mod:`webdataset` so that module holds the record format and this one the file
mechanics. Grain needs random access, so shards are scanned once for their 512-byte headers (no
member data) into compact numpy arrays — one byte span per record, not per member: at
DataCompDR-12M scale (12.8M records × ~6 members, copied into every worker) that is ~20 bytes a
record instead of ~20 a member. ``read`` is then one positional read (``pread``) of the span and
a re-parse of its few headers, which costs little next to the JPEG decode.

:mod:`tarfile` quietly ends an archive at a corrupt or cut-off header; here that raises
:class:`ShardError` (sequential reads) or marks the cut record ``truncated`` (the index), so the
readable records of a shard stay usable and the broken one is named and counted.
No JAX or torch: this runs in data-loader workers.
"""
from __future__ import annotations

import array
import collections
import glob as _glob
import io
import os
import re
import tarfile
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from mobileclip2_jax.data.records import SchemaError

_ERROR_KIND, _ERROR = "__error_kind__", "__error__"  # a fault found while reading (raw dicts)
Shards = Union[Sequence[str], str]

class ShardError(SchemaError):
    """A shard file is truncated or corrupt; ``member`` is the member being read, when known."""

    def __init__(self, path: str, detail: str, member: Optional[str] = None):
        super().__init__(path, detail, member)  # args kept whole: picklable across processes
        self.path, self.detail, self.member = path, detail, member

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


class ShardNotFoundError(SchemaError, FileNotFoundError):
    """A shard path, pattern or directory names no shard file."""


def split_member_name(name: str) -> Tuple[str, str]:
    """``"dir/0001.syn.json"`` → ``("dir/0001", "syn.json")``: webdataset's rule.

    Key = up to the first ``.`` of the basename (directories stay in it, a leading ``./`` goes),
    ext = the rest, lower-cased. No dot gives ext ``""``; readers skip such members and dot-files.
    """
    while name.startswith("./"):
        name = name[2:]
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _scan_tar(f, path: str, file_size: int) -> Iterator[Tuple[str, int, int, int]]:
    """``(name, header offset, data offset, size)`` of each regular member; reads headers only.

    :mod:`tarfile` parses the headers (ustar, GNU, pax) and seeks over the data, but ends quietly
    at a corrupt or cut-off header; that, and data past the end of the file, raise here.
    """
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise ShardError(path, f"not a readable tar file ({e})") from None
    while True:
        try:
            info = tf.next()
        except tarfile.TarError:
            info = None
        if info is None:
            f.seek(tf.offset)
            if f.read(1024).strip(b"\0"):  # neither end of file nor end-of-archive zero blocks
                raise ShardError(path, f"corrupt or cut-off tar header at byte {tf.offset}")
            return
        tf.members.clear()  # tarfile keeps every member; the index keeps its own compact copy
        if info.isreg():
            if info.offset_data + info.size > file_size:
                raise ShardError(path, f"member {info.name!r} is truncated: {info.size} bytes from "
                                       f"byte {info.offset_data} pass the end of the file "
                                       f"({file_size} bytes)", info.name)
            yield info.name, info.offset, info.offset_data, info.size


def _scan_groups(f, path: str, file_size: int):
    """Consecutive members of one key → ``(key, [(ext, header, offset, size)], fault or None)``.

    At a truncation the group it cut (or, when the header is unreadable, the last group, which may
    be incomplete) comes with a ``truncated`` fault and scanning stops; a bad first header raises.
    """
    key, items = None, []

    def group(fault=None):
        exts = [it[0] for it in items]
        if fault is None and len(set(exts)) < len(exts):
            fault = ("duplicate_member", f"members {sorted({e for e in exts if exts.count(e) > 1})} "
                                         f"appear twice for this key")
        return key, items, fault

    try:
        for name, header, offset, size in _scan_tar(f, path, file_size):
            k, ext = split_member_name(name)
            if not ext or not k or k.endswith("/"):
                continue
            if k != key:
                if key is not None:
                    yield group()
                key, items = k, []
            items.append((ext, header, offset, size))
    except ShardError as e:
        cut = split_member_name(e.member)[0] if e.member else None
        if cut is not None and cut != key:
            if key is not None:
                yield group()
            key, items = cut, []
        if key is None:
            raise
        yield group(("truncated", f"shard {e}"))
        return
    if key is not None:
        yield group()


def read_shard_members(path: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Reads a shard sequentially: ``(key, {ext: bytes})`` per sample, in file order.

    A truncated or corrupt shard yields its complete samples, then raises :class:`ShardError`
    naming the file. A key with a repeated member comes with an ``__error_kind__`` entry, which
    :func:`decode_members` turns into a :class:`BadSample`.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        for key, items, fault in _scan_groups(f, path, os.fstat(f.fileno()).st_size):
            if fault is not None and fault[0] == "truncated":
                raise ShardError(path, f"truncated or corrupt at key {key!r}, after the samples "
                                       f"before it ({fault[1]})")
            members: Dict[str, Any] = {}
            for ext, _, offset, n in items:
                f.seek(offset)
                members.setdefault(ext, f.read(n))
            if fault is not None:
                members[_ERROR_KIND], members[_ERROR] = fault
            yield key, members


def _brace_expand(pattern: str) -> List[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    if r:  # zero-padded when an end is, as braceexpand
        a, b = r.groups()
        width = max(len(a), len(b)) if any(len(s) > 1 and s[0] == "0" for s in (a, b)) else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        items = m.group(1).split(",")
    tails = _brace_expand(pattern[m.end():])
    return [pattern[:m.start()] + item + tail for item in items for tail in tails]


def expand_shards(shards: Shards) -> List[str]:
    """Shard paths from a list, a directory (its ``*.tar``, sorted), or brace/glob patterns."""
    specs = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    if not specs:
        raise ShardNotFoundError("no shards given")
    out: List[str] = []
    missing: List[str] = []
    for p in (p for spec in specs for p in _brace_expand(os.fspath(spec))):
        if os.path.isdir(p) or _glob.has_magic(p):
            found = sorted(_glob.glob(os.path.join(_glob.escape(p), "*.tar") if os.path.isdir(p) else p))
            if not found:
                raise ShardNotFoundError(f"directory {p} holds no *.tar shards" if os.path.isdir(p)
                                         else f"shard pattern {p!r} matches no file")
            out.extend(found)
        else:
            (out if os.path.isfile(p) else missing).append(p)
    if missing:
        raise ShardNotFoundError(f"{len(missing)} shard(s) do not exist: {', '.join(missing[:3])}"
                                 f"{', …, ' + missing[-1] if len(missing) > 3 else ''}")
    return out


class _ShardIndex:
    """Header-only index: per record its shard, key, fault and byte span (headers included).

    Only the span is kept, not every member's offset: at DataCompDR scale (12.8M records x ~6
    members, copied into every worker) that is 20 bytes a record instead of ~20 a member; the few
    headers inside a span are parsed again when it is read, which costs little next to the JPEG.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths, self.faults, self._keys = list(paths), {}, None
        shard, start, end, key_end = (array.array(t) for t in "iqqq")
        blob = bytearray()
        for s, path in enumerate(self.paths):
            with open(path, "rb") as f:
                for key, items, fault in _scan_groups(f, path, os.fstat(f.fileno()).st_size):
                    if fault is not None:
                        self.faults[len(key_end)] = fault
                    blob += key.encode("utf-8", "surrogateescape")
                    key_end.append(len(blob))
                    shard.append(s)
                    start.append(items[0][1] if items else 0)
                    end.append(items[-1][2] + items[-1][3] if items else 0)
        self.key_blob = bytes(blob)
        self.rec_shard, self.rec_start, self.rec_end, self.key_end = (
            np.array(a, d) for a, d in ((shard, np.int32), (start, np.int64), (end, np.int64),
                                        (key_end, np.int64)))

    def __len__(self) -> int:
        return len(self.key_end)

    def key(self, i: int) -> str:
        lo = int(self.key_end[i - 1]) if i else 0
        return self.key_blob[lo:int(self.key_end[i])].decode("utf-8", "surrogateescape")

    @property
    def keys(self) -> List[str]:
        if self._keys is None:
            self._keys = [self.key(i) for i in range(len(self))]
        return self._keys

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_keys": None}  # rebuilt on demand; keeps worker pickles small

    def shard_of(self, i: int) -> str:
        return self.paths[int(self.rec_shard[i])]

    def read(self, i: int, reader: "_Reader") -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        start, end, path = int(self.rec_start[i]), int(self.rec_end[i]), self.shard_of(i)
        if end > start:  # a record's members are consecutive: one read covers them all
            blob = reader.read(path, start, end - start)
            for _, items, fault in _scan_groups(io.BytesIO(blob), path, len(blob)):
                for ext, _, offset, n in items:
                    out.setdefault(ext, blob[offset:offset + n])
                if fault is not None:
                    out[_ERROR_KIND], out[_ERROR] = fault
            if len(blob) < end - start:
                out[_ERROR_KIND], out[_ERROR] = "truncated", f"{path} shrank since it was indexed"
        if i in self.faults:
            out[_ERROR_KIND], out[_ERROR] = self.faults[i]
        return out


class _Reader:
    """A per-process LRU of open shard fds shared by all threads; reads are positional (pread).

    Grain reads with many threads, so no per-thread cache (fd limits) and no seek+read pair (a
    lock around I/O): an fd is closed only once evicted *and* unused, so no thread reads a closed
    or reused fd. A forked child closes its inherited copies and starts afresh; pickling drops it.
    """

    def __init__(self, max_open: int = 128):
        self.max_open, self._pid = max_open, os.getpid()
        self._lock, self._fds = threading.Lock(), collections.OrderedDict()  # path → [fd, users, evicted]

    def read(self, path: str, offset: int, size: int) -> bytes:
        if not hasattr(os, "pread"):  # e.g. Windows: no positional read; open per call
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(size)
        if self._pid != os.getpid():  # forked (a lock held by a parent thread would never free)
            for fd, _, _ in self._fds.values():
                os.close(fd)
            self._pid, self._lock, self._fds = os.getpid(), threading.Lock(), collections.OrderedDict()
        with self._lock:
            entry = self._fds.get(path)
            if entry is None:
                entry = self._fds[path] = [os.open(path, os.O_RDONLY), 0, False]
                while len(self._fds) > self.max_open:
                    old = self._fds.popitem(last=False)[1]
                    old[2] = True
                    if not old[1]:
                        os.close(old[0])
            self._fds.move_to_end(path)
            entry[1] += 1
        try:
            return os.pread(entry[0], size, offset)
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[2] and not entry[1]:
                    os.close(entry[0])

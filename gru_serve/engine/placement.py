"""Where onnxruntime runs each node of a session, read from its profile.

`session.get_providers()` lists the providers a session registered, not where its nodes run:
a session asked for CUDA can run some nodes (or, when CUDA does not start, all of them) on the
CPU without an error. onnxruntime's profiler records the provider of every node it runs
(subgraph nodes included), so a session created with profiling on, run on inputs that reach
every branch, then `end_profiling()`, says where each node ran. A compute node elsewhere than
the expected provider is refused; shape arithmetic (integer tensors of a few elements, which
onnxruntime keeps on the CPU on purpose) and the copies between devices are allowed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

# Always allowed wherever they run: the copies between devices and the shape readers.
ALWAYS_ALLOWED = frozenset({"MemcpyToHost", "MemcpyFromHost", "Shape", "Size"})
COPIES = frozenset({"MemcpyToHost", "MemcpyFromHost"})
# A node whose every input and output is an integer or bool tensor of at most this many
# elements is shape arithmetic (trip counts, shapes, indices of a few rows).
SHAPE_ELEMENTS = 16
_INTEGRAL = {"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"}


@dataclass
class Placement:
    """Per graph: nodes run per provider, Memcpy nodes, and the compute nodes found elsewhere
    than `expected` (node name, op type, provider)."""

    expected: str
    counts: dict[str, int] = field(default_factory=dict)
    memcpy: int = 0
    misplaced: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.nodes > 0 and not self.misplaced

    @property
    def nodes(self) -> int:
        return sum(self.counts.values())

    def problem(self, what: str) -> str:
        """'' when every compute node ran on the expected provider, else one line saying which."""
        if self.nodes == 0:
            return f"{what}: the profile recorded no node"
        if not self.misplaced:
            return ""
        shown = ", ".join(f"{name} ({op}) on {prov}" for name, op, prov in self.misplaced[:5])
        more = f" and {len(self.misplaced) - 5} more" if len(self.misplaced) > 5 else ""
        return f"{what}: {len(self.misplaced)} compute node(s) not on {self.expected}: {shown}{more}"


def profiling_options(so: ort.SessionOptions) -> str:
    """Turn profiling on in `so`, writing into a fresh folder (returned; read_profile removes it)."""
    folder = tempfile.mkdtemp(prefix="gru-serve-profile-")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(folder, "session")
    return folder


def _shape_arithmetic(args: dict) -> bool:
    tensors = [*args.get("input_type_shape", []), *args.get("output_type_shape", [])]
    for t in tensors:
        for dtype, dims in t.items():
            if dtype not in _INTEGRAL or math.prod(dims) > SHAPE_ELEMENTS:
                return False
    return bool(tensors)


def placement_of(events: list[dict], expected: str) -> Placement:
    """The placement recorded in a profile's events (its JSON list)."""
    p = Placement(expected)
    counts: collections.Counter[str] = collections.Counter()
    seen: set[tuple[str, str]] = set()
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or "provider" not in args:
            continue
        name, op, prov = (
            e.get("name", "").removesuffix("_kernel_time"),
            args.get("op_name", ""),
            args["provider"],
        )
        if (name, prov) in seen:  # a Loop body's nodes run once per iteration
            continue
        seen.add((name, prov))
        counts[prov] += 1
        if op in COPIES:
            p.memcpy += 1
        if prov != expected and op not in ALWAYS_ALLOWED and not _shape_arithmetic(args):
            p.misplaced.append((name, op, prov))
    p.counts = dict(counts)
    return p


def read_profile(path: str | Path, expected: str) -> Placement:
    """The placement in the profile file `end_profiling()` returned; the file and its folder go."""
    path = Path(path)
    try:
        return placement_of(json.loads(path.read_text()), expected)
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: not ours to remove
            path.parent.rmdir()

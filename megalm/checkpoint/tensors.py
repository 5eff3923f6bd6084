"""megalm's layout-free tensor files: pieces of global tensors, each with its box.

A checkpoint tag holds the model's fp32 weights (``model_*.safetensors``) and the AdamW
moments (``optim_*.safetensors``), one file of each per rank. Every tensor in a file is a
*piece* of a global (tp = 1) tensor named as in :class:`megalm.model.GPT`
(``blocks.3.attn.wq.weight``); the file's safetensors metadata gives, per piece, the global
shape and the box it covers (``[[start, stop], ...]`` per dimension). A reader at any
layout asks for the box its own shard covers and gets it assembled from whichever pieces
intersect it, reading only those bytes (safetensors ``get_slice``).

Rows outside a saved tensor's global shape read as zeros: the vocabulary padding differs
between tensor-parallel degrees (``ModelConfig.padded_vocab``), and padded rows are never
used (no token has their id, and the loss masks their logits).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from megalm.checkpoint.manifest import CheckpointError

Box = tuple[tuple[int, int], ...]
MODEL, OPTIM = "model", "optim"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's first and second moments (Loshchilov & Hutter 2019)


def shard_file(kind: str, tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """File name of one rank's pieces of ``kind`` (``model`` or ``optim``)."""
    return f"{kind}_tp{tp_rank:02d}_pp{pp_rank:02d}_dp{dp_rank:03d}.safetensors"


def moment_key(moment: str, name: str) -> str:
    """Key of an optimizer moment of global tensor ``name`` in an ``optim`` file."""
    return f"{moment}/{name}"


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


Piece = tuple[torch.Tensor, Box, tuple[int, ...], int | None]  # (tensor, box, global shape, vocab dim)


def pieces_bytes(pieces: dict[str, Piece]) -> bytes:
    """``{key: (tensor, box, global shape, vocab dim)}`` as the bytes of one safetensors file."""
    from safetensors.torch import save

    index = {
        k: {"box": [list(b) for b in box], "shape": list(shape), "vocab_dim": vdim}
        for k, (_, box, shape, vdim) in pieces.items()
    }
    return save(
        {k: t.contiguous() for k, (t, _, _, _) in pieces.items()}, metadata={"megalm": json.dumps(index)}
    )


def volume(box: Box) -> int:
    """Elements in ``box`` (the product of its extents)."""
    return math.prod(hi - lo for lo, hi in box)


def _intersect(a: Box, b: Box) -> Box | None:
    box = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in box) else box


class TensorIndex:
    """Every piece of one kind in a tag: ``key -> [(file, box)]`` and each key's global shape.

    Args:
        tag_dir: the checkpoint tag directory.
        kind: ``model`` or ``optim``.
    """

    def __init__(self, tag_dir: Path, kind: str) -> None:
        from safetensors import safe_open

        self.pieces: dict[str, list[tuple[Path, Box]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.vocab_dims: dict[str, int | None] = {}
        self._open: dict[Path, object] = {}
        for path in sorted(Path(tag_dir).glob(f"{kind}_*.safetensors")):
            handle = safe_open(str(path), framework="pt")
            self._open[path] = handle
            for key, entry in json.loads(handle.metadata()["megalm"]).items():
                self.shapes[key] = tuple(entry["shape"])
                self.vocab_dims[key] = entry.get("vocab_dim")
                self.pieces.setdefault(key, []).append((path, tuple(tuple(b) for b in entry["box"])))

    def __contains__(self, key: str) -> bool:
        return key in self.pieces

    def keys(self) -> Iterator[str]:
        return iter(self.pieces)

    def read(self, key: str, box: Box) -> torch.Tensor:
        """The fp32 block ``box`` of global tensor ``key`` (zeros outside its saved shape)."""
        out = torch.zeros([hi - lo for lo, hi in box], dtype=torch.float32)
        covered = 0
        for path, piece in self.pieces[key]:
            common = _intersect(piece, box)
            if common is None:
                continue
            covered += volume(common)
            src = tuple(slice(lo - p0, hi - p0) for (lo, hi), (p0, _) in zip(common, piece, strict=True))
            dst = tuple(slice(lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(common, box, strict=True))
            out[dst] = self._open[path].get_slice(key)[src].float()
        inside = _intersect(box, full_box(self.shapes[key]))
        if covered != (0 if inside is None else volume(inside)):
            raise CheckpointError(f"tensor '{key}' is incomplete in the checkpoint (a piece is missing)")
        return out

    def full(self, key: str) -> torch.Tensor:
        """The whole global tensor ``key``."""
        return self.read(key, full_box(self.shapes[key]))

    def close(self) -> None:
        self._open.clear()


def load_full_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The global (tp = 1) fp32 model state dict of a tag, from any layout it was saved at.

    Returns:
        ``{name: tensor}`` with the names of :class:`megalm.model.GPT` and the saved
        vocabulary padding (rows >= ``model.vocab_size`` are padding).
    """
    index = TensorIndex(tag_dir, MODEL)
    try:
        return {key: index.full(key) for key in sorted(index.keys())}
    finally:
        index.close()


def resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its first dimension cut or zero-padded to ``rows`` (vocabulary padding)."""
    if t.size(0) >= rows:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])])

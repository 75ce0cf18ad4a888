"""Component configurations, each inferred from tensor shapes and checked key by key.

A user never types a dimension: every number here is read off the checkpoint's tensors, and every key the
network will use is checked (present, expected shape, nothing extra) before the first tensor is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MissingKeyError, ShapeMismatchError, UnexpectedKeyError

Shapes = dict[str, tuple[int, ...]]
TRIGGER_WORDS = "fcsks fxhks fhyks"  # the released checkpoints' trigger words (prompts at inference, training captions)


def check_keys(what: str, path: object, found: Shapes, expected: Shapes) -> None:
    """Raise the precise error for the first missing, unexpected or mis-shaped key, naming file and key."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise MissingKeyError(
            f"{what}: '{path}' lacks {len(missing)} tensor(s), first {missing[0]!r} (expected shape "
            f"{list(expected[missing[0]])}). The file is incomplete or belongs to another model; "
            "use the released file unchanged."
        )
    extra = [k for k in found if k not in expected]
    if extra:
        raise UnexpectedKeyError(
            f"{what}: '{path}' has {len(extra)} tensor(s) this checkpoint format does not define, first "
            f"{extra[0]!r} (shape {list(found[extra[0]])}). It is probably a different model; "
            "use the released HyperLoRA file."
        )
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ShapeMismatchError(
                f"{what}: '{path}': tensor {key!r} has shape {list(found[key])}, expected {list(shape)} "
                "from the rest of the checkpoint. The files of this folder do not belong together; "
                "re-download the whole checkpoint folder."
            )


def _need(what: str, path: object, found: Shapes, key: str, ndim: int) -> tuple[int, ...]:
    if key not in found:
        raise MissingKeyError(f"{what}: '{path}' lacks tensor {key!r}; it is not a HyperLoRA {what} file.")
    shape = tuple(found[key])
    if len(shape) != ndim:
        raise ShapeMismatchError(f"{what}: '{path}': tensor {key!r} has shape {list(shape)}, expected {ndim} dims.")
    return shape


@dataclass(frozen=True)
class ResamplerConfig:
    """The Perceiver resampler that turns face tokens into coefficient tokens."""

    dim: int  # width of the latents
    depth: int  # number of blocks
    heads: int  # attention heads
    dim_head: int  # width of one head (64 in the release)
    num_queries: int  # latent tokens: 8 per target module
    out_dim: int  # width of an output token: the basis size K
    x_dim: int  # width of the tokens entering proj_in (ArcFace tokens, or CLIP tokens when alone)
    y_dim: int | None  # width of the CLIP tokens entering proj_in_2; None for a one-condition resampler
    ff_inner: int  # hidden width of the feed-forward (4 × dim in the release)

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "dim_head", "num_queries", "out_dim", "x_dim", "ff_inner"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ResamplerConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head

    @property
    def two_conditions(self) -> bool:
        return self.y_dim is not None

    def expected_shapes(self) -> Shapes:
        d, inner, ff = self.dim, self.inner, self.ff_inner
        shapes: Shapes = {
            "latents": (1, self.num_queries, d),
            "proj_in.weight": (d, self.x_dim),
            "proj_in.bias": (d,),
            "proj_out.weight": (self.out_dim, d),
            "proj_out.bias": (self.out_dim,),
        }
        if self.y_dim is not None:
            shapes["proj_in_2.weight"] = (d, self.y_dim)
            shapes["proj_in_2.bias"] = (d,)
        norms = ["norm_attn1", "norm_attn2_l", "norm_attn2_x", "norm_ff"]
        attns = ["attn1", "attn2"]
        if self.y_dim is not None:
            norms += ["norm_attn3_l", "norm_attn3_y"]
            attns += ["attn3"]
        for n in range(self.depth):
            p = f"layers.{n}."
            for norm in norms:
                shapes[p + norm + ".weight"] = (d,)
                shapes[p + norm + ".bias"] = (d,)
            for attn in attns:
                for lin in ("to_q", "to_k", "to_v"):
                    shapes[f"{p}{attn}.{lin}.weight"] = (inner, d)
                shapes[f"{p}{attn}.to_out.0.weight"] = (d, inner)
            shapes[p + "ff.net.0.proj.weight"] = (ff, d)
            shapes[p + "ff.net.0.proj.bias"] = (ff,)
            shapes[p + "ff.net.2.weight"] = (d, ff)
            shapes[p + "ff.net.2.bias"] = (d,)
        return shapes

    @classmethod
    def from_shapes(cls, found: Shapes, *, what: str, path: object, dim_head: int = 64) -> ResamplerConfig:
        _, num_queries, dim = _need(what, path, found, "latents", 3)
        x_dim = _need(what, path, found, "proj_in.weight", 2)[1]
        out_dim = _need(what, path, found, "proj_out.weight", 2)[0]
        y_dim = _need(what, path, found, "proj_in_2.weight", 2)[1] if "proj_in_2.weight" in found else None
        layer_ids = {int(m.group(1)) for k in found if (m := re.match(r"layers\.(\d+)\.", k))}
        if not layer_ids:
            raise MissingKeyError(f"{what}: '{path}' has no 'layers.<n>.' tensors; it is not a resampler file.")
        inner = _need(what, path, found, "layers.0.attn1.to_q.weight", 2)[0]
        if inner % dim_head:
            raise ShapeMismatchError(
                f"{what}: '{path}': attention width {inner} (layers.0.attn1.to_q.weight) is not a multiple of "
                f"dim_head={dim_head}; pass the dim_head this checkpoint was trained with."
            )
        ff_inner = _need(what, path, found, "layers.0.ff.net.0.proj.weight", 2)[0]
        config = cls(
            dim=dim, depth=max(layer_ids) + 1, heads=inner // dim_head, dim_head=dim_head, num_queries=num_queries,
            out_dim=out_dim, x_dim=x_dim, y_dim=y_dim, ff_inner=ff_inner,
        )
        check_keys(what, path, found, config.expected_shapes())
        return config


@dataclass(frozen=True)
class IdProjectorConfig:
    """Linear(embed → tokens·width), reshape, LayerNorm: ArcFace embedding to identity tokens."""

    embed_dim: int  # ArcFace embedding width (512 for antelopev2's glintr100)
    num_tokens: int  # identity tokens produced (16 in the release)
    width: int  # width of each token; equals the resampler's proj_in input

    def __post_init__(self) -> None:
        if min(self.embed_dim, self.num_tokens, self.width) <= 0:
            raise ValueError(f"IdProjectorConfig dimensions must be positive: {self}")

    def expected_shapes(self) -> Shapes:
        rows = self.num_tokens * self.width
        return {"0.weight": (rows, self.embed_dim), "0.bias": (rows,), "2.weight": (self.width,),
                "2.bias": (self.width,)}

    @classmethod
    def from_shapes(cls, found: Shapes, *, what: str, path: object) -> IdProjectorConfig:
        rows, embed_dim = _need(what, path, found, "0.weight", 2)
        (width,) = _need(what, path, found, "2.weight", 1)
        if rows % width:
            raise ShapeMismatchError(
                f"{what}: '{path}': '0.weight' has {rows} rows, not a multiple of the LayerNorm width {width}."
            )
        config = cls(embed_dim=embed_dim, num_tokens=rows // width, width=width)
        check_keys(what, path, found, config.expected_shapes())
        return config

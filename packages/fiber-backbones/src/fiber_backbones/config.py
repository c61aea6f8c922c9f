"""Typed, frozen configuration of the fusion backbone (``docs/reference/architecture.md`` §2–§4, §7, §9, §12).

Three geometry dataclasses (:class:`SwinConfig`, :class:`TextEncoderConfig`, :class:`FusionConfig`) are grouped
by :class:`BackboneConfig`. The official FIBER checkpoints differ in a handful of behaviours and unused
parameters; these are explicit fields here, set together by :func:`variant_overrides`:

==================  =========  =========  =========  =====================================================
field               coarse     fine_v2    fine_v3    default (clean)
==================  =========  =========  =========  =====================================================
window_rule         coarse     fine       fine       fine (window fixed, any input size, zero padding)
stage_norms         False      True       True       True
final_norm          True       False      False      True
i2t_query_norm      True       False      True       True
t2i_gate_all_layers True       False      False      False (gates only where they are used)
t2i_output_norm     True       False      False      False (no unused LayerNorm)
fused_path_norms    False      True       True       True (fused path applies every LayerNorm)
drop_path_rate      0.1        0.4        0.4        0.1
==================  =========  =========  =========  =====================================================

``fused_path_norms=False`` reproduces the coarse quirks of docs/reference/architecture.md §8.1: on the fused forward path the final Swin
norm and the output LayerNorm of the last text layer are skipped. ``encode_image`` / ``encode_text`` always apply
every norm (ITC path, §8.2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

WindowRule = Literal["coarse", "fine"]
Variant = Literal["coarse", "fine_v2", "fine_v3", "default"]
VARIANTS: tuple[str, ...] = ("coarse", "fine_v2", "fine_v3", "default")
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "xformers", "sdpa", "eager")

ScheduleEntry = tuple[tuple[int, int], int]
Schedule = tuple[ScheduleEntry, ...]


@dataclass(frozen=True)
class SwinConfig:
    """Geometry of the Swin image tower (docs/reference/architecture.md §2).

    Args:
        img_size: nominal square input size in pixels. With ``window_rule="coarse"`` the model accepts exactly
            this size and the window is ``img_size // 32``; with ``"fine"`` it is only a default for demos.
        patch_size: patch-embedding kernel and stride.
        in_chans: input channels.
        embed_dim: channels of stage 0; stage ``s`` has ``embed_dim * 2**s``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window of the fine rule (ignored by the coarse rule, which uses ``img_size // 32``).
        mlp_ratio: hidden width of the MLP relative to ``C``.
        drop_path_rate: stochastic-depth rate of the last block; block ``i`` uses ``rate * i / (n - 1)``.
        qkv_bias: bias in the qkv projection.
        layer_norm_eps: epsilon of every Swin LayerNorm.
        window_rule: ``"coarse"`` (window ``img_size // 32``, fixed grids, no shift when grid <= window) or
            ``"fine"`` (fixed ``window_size``, zero padding to a multiple of the window after LN1, shift on odd
            blocks of every stage).
        out_indices: stages whose outputs form the feature pyramid.
        stage_norms: LayerNorms ``norm{i}`` on the pyramid outputs (fine model).
        final_norm: a final LayerNorm ``norm`` on the last stage (coarse model; used by the ITC path).
    """

    img_size: int = 384
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    window_rule: WindowRule = "coarse"
    out_indices: tuple[int, ...] = (1, 2, 3)
    stage_norms: bool = False
    final_norm: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "out_indices", tuple(int(i) for i in self.out_indices))
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(
                f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} must be non-empty and equal length"
            )
        if any(d < 1 for d in self.depths):
            raise ValueError(f"SwinConfig: every stage needs at least one block, got depths={self.depths}")
        for s, h in enumerate(self.num_heads):
            if self.stage_dim(s) % h:
                raise ValueError(f"SwinConfig: stage {s} width {self.stage_dim(s)} is not divisible by {h} heads")
        if self.window_rule not in ("coarse", "fine"):
            raise ValueError(f"SwinConfig.window_rule must be 'coarse' or 'fine', got {self.window_rule!r}")
        if self.window_rule == "coarse" and self.img_size % self.size_divisibility:
            raise ValueError(
                f"SwinConfig: coarse rule needs img_size divisible by {self.size_divisibility}, got {self.img_size}"
            )
        if self.window_rule == "coarse" and self.img_size // 32 < 1:
            raise ValueError(f"SwinConfig: img_size {self.img_size} too small for the coarse window rule")
        if self.window_size < 1:
            raise ValueError(f"SwinConfig.window_size must be >= 1, got {self.window_size}")
        bad = [i for i in self.out_indices if not 0 <= i < self.num_stages]
        if bad or list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(
                f"SwinConfig.out_indices must be increasing stage indices < {self.num_stages}, got {self.out_indices}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"SwinConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.depths)

    @property
    def size_divisibility(self) -> int:
        """Input sizes the model accepts must be multiples of this (``patch_size * 2**(stages - 1)``)."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    def stage_dim(self, stage: int) -> int:
        """Channel width ``C`` of ``stage``."""
        return self.embed_dim * 2**stage

    def stage_window(self, stage: int) -> tuple[int, int]:
        """``(window, shift)`` of the shifted blocks of ``stage`` under the configured window rule.

        Coarse rule: window ``img_size // 32`` with fixed grids; a stage whose grid is not larger than the
        window uses the whole grid as window and no shift (docs/reference/architecture.md §2.2). Fine rule: fixed window, shift
        ``window // 2`` in every stage (docs/reference/architecture.md §2.3).
        """
        if self.window_rule == "fine":
            return self.window_size, self.window_size // 2
        window = self.img_size // 32
        grid = self.img_size // self.patch_size // 2**stage
        if grid <= window:
            return grid, 0
        return window, window // 2


@dataclass(frozen=True)
class TextEncoderConfig:
    """Geometry of the RoBERTa-style post-LN text tower (docs/reference/architecture.md §3).

    Args:
        vocab_size: rows of the word-embedding table.
        hidden_size: width ``C_txt``.
        num_layers: transformer layers.
        num_heads: attention heads.
        intermediate_size: FFN hidden width.
        max_position_embeddings: rows of the position table (RoBERTa: 514 = 512 + pad offset 2).
        type_vocab_size: rows of the token-type table (RoBERTa: 1).
        pad_token_id: padding id; RoBERTa position ids start at ``pad_token_id + 1``.
        hidden_dropout: dropout on hidden states (also inside the t2i branch output).
        attention_dropout: dropout on attention probabilities (self- and cross-attention).
        layer_norm_eps: epsilon of every text LayerNorm.
    """

    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TextEncoderConfig: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"TextEncoderConfig.pad_token_id {self.pad_token_id} outside the vocabulary ({self.vocab_size})"
            )


def last_n_schedule(swin_depths: Sequence[int], text_layers: int, n: int) -> Schedule:
    """The paper's rule: the last ``n`` Swin blocks (in execution order) pair with the last ``n`` text layers.

    Args:
        swin_depths: blocks per Swin stage, e.g. ``(2, 2, 18, 2)``.
        text_layers: number of text layers, e.g. 12.
        n: number of fused pairs.

    Returns:
        ``(((stage, block), text_layer), ...)`` in execution order; for FIBER-B and ``n=6``:
        ``((2,14),6), ((2,15),7), ((2,16),8), ((2,17),9), ((3,0),10), ((3,1),11)``.
    """
    blocks = [(s, b) for s, d in enumerate(swin_depths) for b in range(d)]
    if not 0 <= n <= min(len(blocks), text_layers):
        raise ValueError(f"last_n_schedule: n={n} must be in [0, {min(len(blocks), text_layers)}]")
    if n == 0:
        return ()
    return tuple((blk, text_layers - n + i) for i, blk in enumerate(blocks[-n:]))


@dataclass(frozen=True)
class FusionConfig:
    """Which blocks fuse and the compatibility options of the gated cross-attention (docs/reference/architecture.md §4–§7).

    Args:
        schedule: ordered ``((stage, block), text_layer)`` pairs; strictly increasing on both sides.
        i2t_query_norm: LayerNorm ``norm_i2t_i`` on the i2t query (coarse and fine v3: True; fine v2: False).
        t2i_gate_all_layers: create ``alpha_t2i`` in every text layer (coarse checkpoints; unused outside the
            schedule) instead of only in fused layers.
        t2i_output_norm: create the unused ``crossattention_t2i.output.LayerNorm`` (coarse checkpoints).
        gate_init: initial value of the trainable gates ``alpha_i2t`` / ``alpha_t2i`` of the scheduled layers.
            0 is the paper's choice (the fused towers start as the uni-modal ones). With towers trained from
            random weights the gates stay near 0 and the fused path learns nothing in a short run; opening them
            (1.0) lets it start (measurements in docs/guides/fusion-from-scratch.md).
    """

    schedule: Schedule = last_n_schedule((2, 2, 18, 2), 12, 6)
    i2t_query_norm: bool = True
    t2i_gate_all_layers: bool = False
    t2i_output_norm: bool = False
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        try:
            sched = tuple(((int(blk[0]), int(blk[1])), int(k)) for blk, k in self.schedule)
        except (TypeError, ValueError, IndexError) as err:
            raise ValueError(
                f"FusionConfig.schedule must be ((stage, block), text_layer) pairs, got {self.schedule!r}"
            ) from err
        object.__setattr__(self, "schedule", sched)
        for (prev_blk, prev_k), (blk, k) in zip(sched, sched[1:]):
            if not (blk > prev_blk and k > prev_k):
                raise ValueError(
                    f"FusionConfig.schedule must be strictly increasing on both sides: {(prev_blk, prev_k)} then {(blk, k)}"
                )

    def validate(self, swin: SwinConfig, text: TextEncoderConfig) -> None:
        """Check that every scheduled block and layer exists.

        Raises:
            ValueError: naming the first entry that points outside the towers.
        """
        for (s, b), k in self.schedule:
            if not (0 <= s < swin.num_stages and 0 <= b < swin.depths[s]):
                raise ValueError(
                    f"FusionConfig.schedule entry {((s, b), k)}: Swin has no block {(s, b)} (depths {swin.depths})"
                )
            if not 0 <= k < text.num_layers:
                raise ValueError(f"FusionConfig.schedule entry {((s, b), k)}: text has {text.num_layers} layers")


@dataclass(frozen=True)
class BackboneConfig:
    """Complete configuration of a :class:`~fiber_backbones.model.FiberBackbone`.

    Args:
        swin: image tower.
        text: text tower.
        fusion: schedule and cross-attention options.
        variant: name of the compatibility preset the config was built from (informational).
        fused_path_norms: apply the final Swin norm and the last text layer's output LayerNorm on the
            ``forward`` path (False reproduces the coarse-model quirk of docs/reference/architecture.md §8.1).
        attention_backend: ``"auto" | "xformers" | "sdpa" | "eager"`` (see :mod:`fiber_backbones.attention`).
    """

    swin: SwinConfig = field(default_factory=SwinConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    variant: str = "coarse"
    fused_path_norms: bool = False
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"BackboneConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"BackboneConfig.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        self.fusion.validate(self.swin, self.text)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            KeyError: for an unknown key, naming its dotted path (e.g. ``swin.windw_size``).
        """
        return _from_dict(cls, data, prefix="")

    def replace(self, overrides: Mapping[str, Any]) -> BackboneConfig:
        """Copy with ``overrides`` applied; keys are dotted (``"text.vocab_size"``) or nested dicts.

        A ``"variant"`` key first applies that preset (:func:`variant_overrides`), then the other keys.

        Raises:
            KeyError: for an unknown key, naming it.
        """
        flat = flatten_overrides(overrides)
        if "variant" in flat:
            flat = {**variant_overrides(str(flat.pop("variant"))), **flat}
        merged = self.to_dict()
        for key, value in flat.items():
            node: dict[str, Any] = merged
            parts = key.split(".")
            for depth, part in enumerate(parts):
                if part not in node:
                    raise KeyError(
                        f"unknown config key {key!r} (no field {part!r} at {'.'.join(parts[:depth]) or 'top level'})"
                    )
                if depth == len(parts) - 1:
                    node[part] = _to_plain(value)
                else:
                    if not isinstance(node[part], dict):
                        raise KeyError(f"config key {key!r}: {'.'.join(parts[: depth + 1])!r} is not a section")
                    node = node[part]
        return BackboneConfig.from_dict(merged)


def flatten_overrides(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested override dicts into dotted keys (``{"swin": {"img_size": 64}} -> {"swin.img_size": 64}``)."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and full in ("swin", "text", "fusion"):
            flat.update(flatten_overrides(value, prefix=f"{full}."))
        else:
            flat[full] = value
    return flat


def variant_overrides(variant: str) -> dict[str, Any]:
    """Dotted overrides that turn any geometry into the given compatibility preset (table in the module doc)."""
    presets: dict[str, dict[str, Any]] = {
        "coarse": {
            "swin.window_rule": "coarse",
            "swin.stage_norms": False,
            "swin.final_norm": True,
            "swin.drop_path_rate": 0.1,
            "fusion.i2t_query_norm": True,
            "fusion.t2i_gate_all_layers": True,
            "fusion.t2i_output_norm": True,
            "fused_path_norms": False,
        },
        "fine_v2": {
            "swin.window_rule": "fine",
            "swin.stage_norms": True,
            "swin.final_norm": False,
            "swin.drop_path_rate": 0.4,
            "fusion.i2t_query_norm": False,
            "fusion.t2i_gate_all_layers": False,
            "fusion.t2i_output_norm": False,
            "fused_path_norms": True,
        },
        "default": {
            "swin.window_rule": "fine",
            "swin.stage_norms": True,
            "swin.final_norm": True,
            "swin.drop_path_rate": 0.1,
            "fusion.i2t_query_norm": True,
            "fusion.t2i_gate_all_layers": False,
            "fusion.t2i_output_norm": False,
            "fused_path_norms": True,
        },
    }
    presets["fine_v3"] = {**presets["fine_v2"], "fusion.i2t_query_norm": True}
    if variant not in presets:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return {**presets[variant], "variant": variant}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


_SECTIONS: dict[str, type] = {"swin": SwinConfig, "text": TextEncoderConfig, "fusion": FusionConfig}


def _from_dict(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise TypeError(
            f"config section {prefix.rstrip('.') or 'top level'} must be a mapping, got {type(data).__name__}"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise KeyError(f"unknown config key {prefix + unknown[0]!r} (valid keys: {sorted(names)})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if cls is BackboneConfig and key in _SECTIONS:
            kwargs[key] = _from_dict(_SECTIONS[key], value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _to_tuple(value)
    return cls(**kwargs)

"""Component addresses: one grammar for every unit the methods attribute to.

An address is the real module path inside the suite's model (``unet.`` or ``text_encoder.`` first) plus an optional
index in brackets::

    unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0           layer   (the module's whole output)
    unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0[17]       neuron  (output feature 17 / conv channel 17)
    unet.mid_block.attentions.0.transformer_blocks.0.attn2[3]           head    (head 3 of an attention module)
    unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight[5,17]  weight (one scalar parameter, CAD's unit)
    unet.mid_block.attentions.0.transformer_blocks.0.ff#f12             feature (latent 12 of a sparse autoencoder
                                                                                 attached at that module's output)
    unet.mid_block.attentions.0.transformer_blocks.0.attn2#kv3          tokenkv (head 3's key and value of the
                                                                                 concept's tokens, :mod:`interp.core.tokens`)
    unet.mid_block.attentions.0.transformer_blocks.0.attn2#kvs3         tokenspan (the same at the concept's tokens
                                                                                   and every later position)

Token-KV addresses (granularity ``tokenkv``) exist for every cross-attention (``attn2``: the UNets' and PixArt's),
one per head: the key and value rows that head reads at the context positions of the objective's concept word.
Ablating one replaces them by the anchor prompt's (:mod:`interp.core.tokens`). Token-span addresses (granularity
``tokenspan``, ``#kvs``) are the same heads at the concept's positions and every later one (which the causal text
encoder has let see the concept). Joint attention (SD3, FLUX) has neither (:func:`no_token_kv_message`).

Feature addresses exist once a sparse autoencoder is attached at the module (:func:`interp.core.features.attach`): the
space then holds its site (:meth:`ComponentSpace.add_feature_site`), any module whose output the suite can reach,
whether or not the family tables list it.

Addresses parse into the frozen :class:`Component` and print back identically. Which modules are components, and
of which family, comes from a per-architecture table (:data:`FAMILY_TABLES`) keyed by the model class, matched on
module paths: no attribute sniffing. For the UNet's GEGLU feed-forward, ``ff.net.0[j]`` is hidden unit ``j`` (the
GEGLU output, i.e. input column ``j`` of ``ff.net.2``): the unit CAD's row sums and the anchors' "feed-forward
neurons" refer to.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch.nn as nn

GRANULARITIES = ("layer", "neuron", "head", "weight", "feature", "tokenkv", "tokenspan")


@dataclass(frozen=True)
class FamilyRule:
    """One row of an architecture's family table."""

    family: str
    pattern: str  # regex on the module path relative to the model root; group "layer" is the layer container
    kind: str  # what the module is, e.g. "ff.net.0"
    granularities: tuple[str, ...]
    site: str  # how neurons/heads are reached: "out_last" | "out_channel" | "heads" | "none"
    #: tensors of the module's output tuple that make up its state: 2 for a joint block or joint attention (the
    #: image and the context stream); a layer's multiplier scales each, a mean ablation uses each one's mean
    streams: int = 1


_TB = r"(?P<layer>(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+)"
_RES = r"(?P<layer>(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+)"
_TXT = r"(?P<layer>(?:text_model\.)?encoder\.layers\.\d+)"
_T5 = r"(?P<layer>encoder\.block\.\d+)"
_DIT = r"(?P<layer>transformer_blocks\.\d+)"  # a diffusion transformer's (joint or cross-attention) block
_SINGLE = r"(?P<layer>single_transformer_blocks\.\d+)"  # FLUX's single-stream blocks

_CLIP_TABLE = (
    FamilyRule("text_layer", _TXT + r"$", "encoder_layer", ("layer",), "none"),
    FamilyRule("text_attn", _TXT + r"\.self_attn$", "self_attn", ("layer", "head"), "heads"),
    FamilyRule("text_attn", _TXT + r"\.self_attn\.(?P<k>q_proj|k_proj|v_proj|out_proj)$", "self_attn.{k}", ("layer", "neuron", "weight"), "out_last"),
    FamilyRule("text_mlp", _TXT + r"\.mlp$", "mlp", ("layer",), "none"),
    FamilyRule("text_mlp", _TXT + r"\.mlp\.(?P<k>fc1|fc2)$", "mlp.{k}", ("layer", "neuron", "weight"), "out_last"),
)

#: Blocks of joint attention (SD3's and FLUX's MM-DiT): an image stream and a context (text) stream that attend
#: together; ``attn`` heads span both streams, ``attn.add_*``/``to_add_out`` and ``ff_context`` are the context's.
_JOINT = (
    FamilyRule("block", _DIT + r"$", "transformer_block", ("layer",), "none", streams=2),
    FamilyRule("attn", _DIT + r"\.attn$", "attn", ("layer", "head"), "heads", streams=2),
    FamilyRule("attn", _DIT + r"\.attn\.(?P<k>to_q|to_k|to_v|to_out\.0)$", "attn.{k}", ("layer", "neuron", "weight"), "out_last"),
    FamilyRule("attn_context", _DIT + r"\.attn\.(?P<k>add_q_proj|add_k_proj|add_v_proj|to_add_out)$", "attn.{k}", ("layer", "neuron", "weight"), "out_last"),
    FamilyRule("ff", _DIT + r"\.ff$", "ff", ("layer",), "none"),
    FamilyRule("ff", _DIT + r"\.ff\.net\.0$", "ff.net.0", ("layer", "neuron"), "out_last"),
    FamilyRule("ff", _DIT + r"\.ff\.net\.2$", "ff.net.2", ("layer", "neuron", "weight"), "out_last"),
    FamilyRule("ff_context", _DIT + r"\.ff_context$", "ff_context", ("layer",), "none"),
    FamilyRule("ff_context", _DIT + r"\.ff_context\.net\.0$", "ff_context.net.0", ("layer", "neuron"), "out_last"),
    FamilyRule("ff_context", _DIT + r"\.ff_context\.net\.2$", "ff_context.net.2", ("layer", "neuron", "weight"), "out_last"),
)


def _basic_blocks(layer: str, gelu_proj: bool) -> tuple[FamilyRule, ...]:
    """Rules of diffusers' BasicTransformerBlock at ``layer``: self-attention, cross-attention, feed-forward
    (``ff.net.0.proj``, a GEGLU's projection, is a kind of its own in the UNet)."""
    proj = (FamilyRule("ff", layer + r"\.ff\.net\.0\.proj$", "ff.net.0.proj", ("layer", "neuron", "weight"), "out_last"),)
    return (
        FamilyRule("block", layer + r"$", "transformer_block", ("layer",), "none"),
        FamilyRule("attn1", layer + r"\.attn1$", "attn1", ("layer", "head"), "heads"),
        FamilyRule("attn1", layer + r"\.attn1\.(?P<k>to_q|to_k|to_v|to_out\.0)$", "attn1.{k}", ("layer", "neuron", "weight"), "out_last"),
        FamilyRule("attn2", layer + r"\.attn2$", "attn2", ("layer", "head", "tokenkv", "tokenspan"), "heads"),
        FamilyRule("attn2", layer + r"\.attn2\.(?P<k>to_q|to_k|to_v|to_out\.0)$", "attn2.{k}", ("layer", "neuron", "weight"), "out_last"),
        FamilyRule("ff", layer + r"\.ff$", "ff", ("layer",), "none"),
        FamilyRule("ff", layer + r"\.ff\.net\.0$", "ff.net.0", ("layer", "neuron"), "out_last"),
        *(proj if gelu_proj else ()),
        FamilyRule("ff", layer + r"\.ff\.net\.2$", "ff.net.2", ("layer", "neuron", "weight"), "out_last"),
    )


#: Family tables per architecture (keyed by the class name of the model the prefix points to).
FAMILY_TABLES: dict[str, tuple[FamilyRule, ...]] = {
    "UNet2DConditionModel": _basic_blocks(_TB, gelu_proj=True) + (
        FamilyRule("resnet", _RES + r"$", "resnet", ("layer",), "none"),
        FamilyRule("resnet", _RES + r"\.(?P<k>conv1|conv2)$", "{k}", ("layer", "neuron", "weight"), "out_channel"),
    ),
    # PixArt: a stack of BasicTransformerBlocks (self-attention, cross-attention to T5, feed-forward)
    "PixArtTransformer2DModel": _basic_blocks(_DIT, gelu_proj=False),
    "SD3Transformer2DModel": _JOINT,
    "FluxTransformer2DModel": _JOINT + (
        FamilyRule("single_block", _SINGLE + r"$", "single_block", ("layer",), "none", streams=2),
        FamilyRule("single_attn", _SINGLE + r"\.attn$", "attn", ("layer", "head"), "heads"),
        FamilyRule("single_attn", _SINGLE + r"\.attn\.(?P<k>to_q|to_k|to_v)$", "attn.{k}", ("layer", "neuron", "weight"), "out_last"),
        FamilyRule("single_mlp", _SINGLE + r"\.(?P<k>proj_mlp|proj_out)$", "{k}", ("layer", "neuron", "weight"), "out_last"),
    ),
    "CLIPTextModel": _CLIP_TABLE,
    "CLIPTextModelWithProjection": _CLIP_TABLE,
    "T5EncoderModel": (
        FamilyRule("text_layer", _T5 + r"$", "encoder_layer", ("layer",), "none"),
        FamilyRule("text_attn", _T5 + r"\.layer\.0\.SelfAttention$", "SelfAttention", ("layer", "head"), "heads"),
        FamilyRule("text_attn", _T5 + r"\.layer\.0\.SelfAttention\.(?P<k>q|k|v|o)$", "SelfAttention.{k}", ("layer", "neuron", "weight"), "out_last"),
        FamilyRule("text_mlp", _T5 + r"\.layer\.1\.DenseReluDense$", "DenseReluDense", ("layer",), "none"),
        FamilyRule("text_mlp", _T5 + r"\.layer\.1\.DenseReluDense\.(?P<k>wi|wi_0|wi_1|wo)$", "DenseReluDense.{k}", ("layer", "neuron", "weight"), "out_last"),
    ),
}

_ADDRESS = re.compile(r"^(?P<path>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)(?:\[(?P<idx>\d+(?:,\d+)*)\])?$")


_FEATURE = re.compile(r"^(?P<path>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)#f(?P<idx>\d+)$")
_TOKEN_KV = re.compile(r"^(?P<path>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)#kv(?P<span>s?)(?P<idx>\d+)$")
#: The token granularities: a head's key and value at the concept's tokens (``#kv``), or at them and every later
#: context position (``#kvs``).
TOKEN_GRANULARITIES = ("tokenkv", "tokenspan")


def no_token_kv_message(denoiser) -> str:
    """Why a denoiser has no token-KV components (no cross-attention reads the text), and what to use instead."""
    name = type(denoiser).__name__
    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        return (f"token-KV components (tokenkv, tokenspan) are cross-attention heads, and the {name} reads the "
                f"text through joint attention, whose context keys and values depend on the image and the timestep: "
                f"not supported; attribute the context stream's projections instead (--granularity neuron --families "
                f"attn_context --kinds attn.add_k_proj attn.add_v_proj)")
    return (f"token-KV components (tokenkv, tokenspan) are cross-attention (attn2) heads, and the {name} has "
            f"none: use --granularity head or neuron")


class UnknownComponentError(KeyError):
    """An address that names no component of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownFeatureError(UnknownComponentError, ValueError):
    """A feature address that names no latent of an attached sparse autoencoder (also a ValueError: bad input)."""


@dataclass(frozen=True)
class FeatureSite:
    """A module with a sparse autoencoder attached at its output: the module's place in the model and the
    dictionary (:class:`interp.core.features.FeatureDictionary`) whose latents are its feature components."""

    info: "ModuleInfo"
    dictionary: object = field(repr=False, compare=False)

    @property
    def n_features(self) -> int:
        return self.dictionary.n_features


@dataclass(frozen=True, order=True)
class Component:
    """A parsed component address. ``str(c)`` is the address; :meth:`ComponentSpace.parse` builds it."""

    address: str
    model: str = field(compare=False)  # the part: "unet" | "transformer" | "text_encoder" | "text_encoder_2" | ...
    module: str = field(compare=False)  # full module path, e.g. "unet.mid_block....ff.net.0"
    param: str | None = field(compare=False)  # "weight" | "bias" for weight granularity
    unit: tuple[int, ...] | None = field(compare=False)
    family: str = field(compare=False)
    block: str = field(compare=False)  # stage: down_blocks.1 | mid_block | up_blocks.0 | text_encoder
    layer: str = field(compare=False)  # container: a transformer block, resnet or text-encoder layer
    depth: int = field(compare=False)  # execution order of the layer container within its model
    kind: str = field(compare=False)
    granularity: str = field(compare=False)

    def __str__(self) -> str:
        return self.address

    @property
    def index(self) -> int | None:
        """The single unit index of a neuron or head."""
        return None if self.unit is None else self.unit[0]


@dataclass(frozen=True)
class ModuleInfo:
    path: str  # full path with model prefix
    model: str
    rule: FamilyRule
    kind: str
    layer: str
    block: str
    depth: int
    module: nn.Module = field(repr=False, compare=False)

    @property
    def n_units(self) -> int:
        return unit_count(self.module, self.rule.site)


def unit_count(module: nn.Module, site: str) -> int:
    if site == "heads":
        return _n_heads(module)
    if site == "out_channel":
        return module.out_channels
    if site == "out_last":
        return neuron_count(module)
    raise TypeError(f"no unit count for {type(module).__name__} at site {site!r}")


#: Activation modules whose output is half their projection's width (gated: GEGLU) or all of it (GELU).
_GATED = {"GEGLU": 2, "SwiGLU": 2, "GELU": 1, "ApproximateGELU": 1}


def neuron_count(module: nn.Module) -> int:
    """Output features of a module whose neurons are reached at its output's last axis (or channels, for a conv)."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    proj = getattr(module, "proj", None)  # diffusers' activation modules: a projection, then the nonlinearity
    if isinstance(proj, nn.Linear) and type(module).__name__ in _GATED:
        return proj.out_features // _GATED[type(module).__name__]
    raise TypeError(f"no neuron count for {type(module).__name__}")


def _n_heads(module: nn.Module) -> int:
    for name in ("heads", "num_heads", "n_heads"):  # diffusers, CLIP, T5
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    raise TypeError(f"{type(module).__name__} has no head count")


def _out_projections(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The output projections that heads' features enter: diffusers' ``to_out.0`` (and a joint attention's
    context-stream ``to_add_out``), CLIP's ``out_proj``, T5's ``o``; none for FLUX's single-stream attention."""
    if hasattr(module, "to_out"):
        outs = [(".to_out.0", module.to_out[0])] if module.to_out is not None else []
        if getattr(module, "to_add_out", None) is not None:
            outs.append((".to_add_out", module.to_add_out))
        return outs
    for name in ("out_proj", "o"):
        if isinstance(getattr(module, name, None), nn.Linear):
            return [(f".{name}", getattr(module, name))]
    return []


def head_dim(module: nn.Module) -> int:
    return head_sites(module)[0][3]


def head_sites(module: nn.Module) -> list[tuple[str, str, int, int]]:
    """Where an attention module's heads are reached: ``(path suffix, event, features, head width)`` for each input
    of an output projection; or the attention's own output (``("", "out", ...)``) when it has none (FLUX's
    single-stream blocks project attention and MLP together)."""
    heads = _n_heads(module)
    outs = _out_projections(module)
    if outs:
        return [(suffix, "in", lin.in_features, lin.in_features // heads) for suffix, lin in outs]
    width = module.to_q.out_features  # heads x head width (the query's, which the output has)
    return [("", "out", width, width // heads)]


def is_text_part(model: str) -> bool:
    """Whether an address prefix names a text encoder (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``)."""
    return model.startswith("text_encoder")


def part_rank(model: str) -> tuple[int, str]:
    """Sort key of a model part in execution order: the text encoders (in order), then the denoiser."""
    return (0, model) if is_text_part(model) else (1, model)


def _stage(rel: str, model: str) -> str:
    if is_text_part(model):
        return model
    m = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)", rel)
    return m.group(1) if m else rel.split(".")[0]


def short_layer(layer: str, model: str) -> str:
    """A compact label for plots: ``down_blocks.1.attentions.0.transformer_blocks.0`` -> ``down1.a0.tb0``; a
    transformer's ``transformer_blocks.3`` -> ``tb3`` (FLUX's single-stream ``single_transformer_blocks.0`` ->
    ``stb0``); a text layer ``text.L3`` (``text2.L3``, ``text3.L3`` in a second and third encoder)."""
    text = "text" + model[len("text_encoder"):].replace("_", "") if is_text_part(model) else "text"
    s = layer.replace("text_model.", "").replace("encoder.layers.", f"{text}.L").replace("encoder.block.", f"{text}.L")
    s = s.replace("down_blocks.", "down")
    s = s.replace("up_blocks.", "up").replace("mid_block", "mid").replace(".attentions.", ".a")
    s = s.replace(".transformer_blocks.", ".tb").replace(".resnets.", ".res")
    if s.startswith("single_transformer_blocks."):
        s = "stb" + s[len("single_transformer_blocks."):]
    elif s.startswith("transformer_blocks."):
        s = "tb" + s[len("transformer_blocks."):]
    return s


class ComponentSpace:
    """All components of a model, from its architecture's family tables.

    ``models`` maps a prefix (``"unet"``, ``"text_encoder"``) to the module; ``order`` optionally maps full module
    paths to their execution order (from one forward pass), used for depth and for nnsight's in-order access.
    """

    def __init__(self, models: dict[str, nn.Module], order: dict[str, int] | None = None):
        self.models = models
        self.modules: dict[str, ModuleInfo] = {}
        #: Modules with a sparse autoencoder attached (:meth:`add_feature_site`), by path.
        self.features: dict[str, FeatureSite] = {}
        layer_order: dict[tuple[str, str], int] = {}
        order = order or {}
        self.order = order
        for prefix, root in models.items():
            table = FAMILY_TABLES.get(type(root).__name__)
            if table is None:
                raise TypeError(
                    f"no component family table for {type(root).__name__} ({prefix}); known architectures: "
                    f"{sorted(FAMILY_TABLES)}"
                )
            found = []
            for rel, mod in root.named_modules():
                for rule in table:
                    m = re.fullmatch(rule.pattern, rel)
                    if m:
                        kind = rule.kind.format(**{k: v for k, v in m.groupdict().items() if k != "layer"})
                        found.append((rel, mod, rule, kind, m.group("layer")))
                        break
            layers = sorted({f[4] for f in found}, key=lambda l: order.get(f"{prefix}.{l}", 0))
            for i, l in enumerate(layers):
                layer_order[(prefix, l)] = i
            for rel, mod, rule, kind, layer in found:
                path = f"{prefix}.{rel}"
                self.modules[path] = ModuleInfo(
                    path, prefix, rule, kind, layer, _stage(rel, prefix), layer_order[(prefix, layer)], mod
                )

    # -- parsing -------------------------------------------------------------------------------------------
    def parse(self, address: str | Component) -> Component:
        """Parse and validate an address; unknown ones raise :class:`UnknownComponentError` with suggestions."""
        if isinstance(address, Component):
            return address
        if isinstance(address, str) and "#kv" in address:
            return self._parse_token_kv(address.strip())
        if isinstance(address, str) and "#" in address:
            return self._parse_feature(address.strip())
        m = _ADDRESS.match(address.strip()) if isinstance(address, str) else None
        if not m:
            raise UnknownComponentError(
                f"{address!r} is not a component address: write a module path with an optional [index], e.g. "
                f"'unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0[17]'"
            )
        path, idx = m.group("path"), m.group("idx")
        unit = tuple(int(i) for i in idx.split(",")) if idx else None
        param = None
        if path not in self.modules and path.rsplit(".", 1)[-1] in ("weight", "bias"):
            path, param = path.rsplit(".", 1)
        info = self.modules.get(path)
        if info is None:
            raise UnknownComponentError(self._unknown_message(path))
        rule = info.rule
        if param is not None:
            if "weight" not in rule.granularities:
                raise UnknownComponentError(f"{path} has no scalar-weight components; its granularities are {rule.granularities}")
            tensor = getattr(info.module, param, None)
            if tensor is None:
                raise UnknownComponentError(f"{path} has no parameter {param!r}")
            if unit is None or len(unit) != tensor.dim() or any(not 0 <= u < s for u, s in zip(unit, tensor.shape)):
                raise UnknownComponentError(
                    f"{address!r}: a scalar of {path}.{param} needs {tensor.dim()} indices within shape {tuple(tensor.shape)}"
                )
            granularity = "weight"
        elif unit is None:
            granularity = "layer"
        else:
            granularity = "head" if rule.site == "heads" else "neuron"
            if granularity not in rule.granularities:
                raise UnknownComponentError(
                    f"{path} ({info.kind}) has no {granularity} units; use it as a whole layer (no [index]) — "
                    f"its granularities are {rule.granularities}"
                )
            n = info.n_units
            if len(unit) != 1 or not 0 <= unit[0] < n:
                raise UnknownComponentError(f"{address!r}: {path} has {n} {granularity}s, indices 0..{n - 1}")
        canonical = path + (f".{param}" if param else "") + (f"[{','.join(map(str, unit))}]" if unit else "")
        return Component(
            canonical, info.model, path, param, unit, rule.family, info.block, short_layer(info.layer, info.model),
            info.depth, info.kind, granularity,
        )

    def _parse_feature(self, address: str) -> Component:
        m = _FEATURE.match(address)
        if not m:
            raise UnknownFeatureError(f"{address!r} is not a feature address: write a module path, '#f' and a "
                                      f"latent index, e.g. 'unet.mid_block.attentions.0.transformer_blocks.0.ff#f12'")
        path, i = m.group("path"), int(m.group("idx"))
        site = self.features.get(path)
        if site is None:
            attached = ", ".join(sorted(self.features)) or "none"
            raise UnknownFeatureError(f"{address!r}: no sparse autoencoder is attached at {path} (attached: "
                                      f"{attached}); attach one with interp.core.features.attach(model, "
                                      f"interp.core.features.load_sae(FOLDER))")
        if not 0 <= i < site.n_features:
            raise UnknownFeatureError(f"{address!r}: the sparse autoencoder at {path} has {site.n_features} "
                                      f"features, indices 0..{site.n_features - 1}")
        info = site.info
        return Component(f"{path}#f{i}", info.model, path, None, (i,), info.rule.family, info.block,
                         short_layer(info.layer, info.model), info.depth, info.kind, "feature")

    def _parse_token_kv(self, address: str) -> Component:
        m = _TOKEN_KV.match(address)
        if not m:
            raise UnknownComponentError(f"{address!r} is not a token-KV address: write a cross-attention's path, "
                                        f"'#kv' (or '#kvs': the concept's tokens and every later position) and a "
                                        f"head, e.g. 'unet.mid_block.attentions.0.transformer_blocks.0.attn2#kv3'")
        path, h, span = m.group("path"), int(m.group("idx")), m.group("span")
        info = self.modules.get(path)
        if info is None:
            raise UnknownComponentError(self._unknown_message(path))
        if "tokenkv" not in info.rule.granularities:
            if not any("tokenkv" in i.rule.granularities for i in self.modules.values()):
                raise UnknownComponentError(f"{address!r}: " + no_token_kv_message(self.models[info.model]))
            raise UnknownComponentError(f"{address!r}: {path} ({info.kind}) has no token-KV components; they are "
                                        f"cross-attention (attn2) heads")
        n = info.n_units
        if not 0 <= h < n:
            raise UnknownComponentError(f"{address!r}: {path} has {n} heads, indices 0..{n - 1}")
        return Component(f"{path}#kv{span}{h}", info.model, path, None, (h,), info.rule.family, info.block,
                         short_layer(info.layer, info.model), info.depth, info.kind,
                         "tokenspan" if span else "tokenkv")

    def add_feature_site(self, path: str, dictionary, module: nn.Module) -> FeatureSite:
        """Make the latents of ``dictionary`` (``n_features`` of them) the feature components ``path#f<i>``.

        A module of the family tables keeps its family, kind, block and layer (so ``family="ff"`` filters its
        features too); any other module (a UNet attention stage, ``up_blocks.1.attentions.1``, SAeUron's site) is of
        family ``sae``, its kind its class name. Replaces a dictionary attached there before."""
        prefix, _, rel = path.partition(".")
        info = self.modules.get(path)
        if info is None:
            rule = FamilyRule("sae", "", type(module).__name__, ("feature",), "features")
            mine = self.order.get(path, 0)
            # depth: after every layer of its part that starts before it (its own, when it is inside one)
            before = [i.depth for i in self.modules.values() if i.model == prefix and self.order.get(i.path, -1) <= mine]
            info = ModuleInfo(path, prefix, rule, rule.kind, rel, _stage(rel, prefix), max(before, default=0), module)
        site = self.features[path] = FeatureSite(info, dictionary)
        return site

    def remove_feature_site(self, path: str) -> None:
        """Forget the dictionary attached at ``path`` (its feature addresses no longer parse)."""
        self.features.pop(path, None)

    def _unknown_message(self, path: str) -> str:
        near = difflib.get_close_matches(path, list(self.modules), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        prefixes = ", ".join(f"'{p}.'" for p in self.models)
        return f"unknown component {path!r}: no such module among this model's components (prefixes {prefixes}).{hint}"

    # -- enumeration ---------------------------------------------------------------------------------------
    def iter(
        self,
        granularity: str = "neuron",
        family: str | Iterable[str] | None = None,
        kind: str | Iterable[str] | None = None,
        block: str | Iterable[str] | None = None,
        layer: str | Iterable[str] | None = None,
        model: str | Iterable[str] | None = None,
    ) -> Iterator[Component]:
        """Every component of one granularity matching all filters, in execution order of the layers."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; choose from {GRANULARITIES}")
        filters = {"family": family, "kind": kind, "block": block, "model": model}
        sets = {k: ({v} if isinstance(v, str) else set(v)) for k, v in filters.items() if v is not None}
        layer_set = None if layer is None else ({layer} if isinstance(layer, str) else set(layer))
        self._check_filters(sets, layer_set)
        if granularity == "feature":  # the latents of the attached dictionaries, site by site in execution order
            for path in sorted(self.features, key=lambda p: (part_rank(p.split(".", 1)[0]), self.order.get(p, 0))):
                site = self.features[path]
                if self._matches(site.info, {**filters, "layer": layer}):
                    for i in range(site.n_features):
                        yield self._parse_feature(f"{path}#f{i}")
            return
        if granularity in TOKEN_GRANULARITIES and not any(granularity in i.rule.granularities
                                                          for i in self.modules.values()):
            denoiser = [m for p, m in self.models.items() if not is_text_part(p)]
            raise ValueError(no_token_kv_message(denoiser[0] if denoiser else next(iter(self.models.values()))))
        infos = sorted(self.modules.values(), key=lambda i: (part_rank(i.model), i.depth, i.path))
        for info in infos:
            if any(getattr(info, k) not in v for k, v in sets.items() if k != "family") or (
                "family" in sets and info.rule.family not in sets["family"]
            ):
                continue
            if layer_set is not None and short_layer(info.layer, info.model) not in layer_set and info.layer not in layer_set:
                continue
            if granularity not in info.rule.granularities:
                continue
            if granularity == "layer":
                yield self.parse(info.path)
            elif granularity in ("neuron", "head"):
                if (granularity == "head") != (info.rule.site == "heads"):
                    continue
                for u in range(info.n_units):
                    yield self.parse(f"{info.path}[{u}]")
            elif granularity in TOKEN_GRANULARITIES:
                suffix = "#kvs" if granularity == "tokenspan" else "#kv"
                for u in range(info.n_units):
                    yield self._parse_token_kv(f"{info.path}{suffix}{u}")
            else:
                for pname, p in info.module.named_parameters(recurse=False):
                    for flat in range(p.numel()):
                        idx = _unravel(flat, p.shape)
                        yield self.parse(f"{info.path}.{pname}[{','.join(map(str, idx))}]")

    def select(self, granularity: str = "neuron", **filters) -> "ComponentSet":
        """:meth:`iter`'s components as a :class:`ComponentSet` (raises ValueError when none match)."""
        return ComponentSet(list(self.iter(granularity, **filters)))

    def count(self, granularity: str = "neuron", **filters) -> int:
        """How many components :meth:`iter` would give (scalar weights counted without building them)."""
        if granularity == "weight":  # counting scalars does not need their dataclasses
            sets = {k: ({v} if isinstance(v, str) else set(v)) for k, v in filters.items()
                    if v is not None and k != "layer"}
            layer = filters.get("layer")
            self._check_filters(sets, None if layer is None else ({layer} if isinstance(layer, str) else set(layer)))
            return sum(
                p.numel()
                for info in self.modules.values()
                if "weight" in info.rule.granularities and self._matches(info, filters)
                for p in info.module.parameters(recurse=False)
            )
        return sum(1 for _ in self.iter(granularity, **filters))

    def _matches(self, info: ModuleInfo, filters: dict) -> bool:
        for k, v in filters.items():
            if v is None:
                continue
            vals = {v} if isinstance(v, str) else set(v)
            have = {"family": info.rule.family, "kind": info.kind, "block": info.block, "model": info.model,
                    "layer": short_layer(info.layer, info.model)}[k]
            if have not in vals and not (k == "layer" and info.layer in vals):
                return False
        return True

    def _check_filters(self, sets: dict, layer_set: set | None) -> None:
        every = [*self.modules.values(), *(f.info for f in self.features.values())]
        known = {
            "family": {i.rule.family for i in every},
            "kind": {i.kind for i in every},
            "block": {i.block for i in every},
            "model": set(self.models),
        }
        for k, vals in sets.items():
            bad = vals - known[k]
            if bad:
                raise ValueError(f"unknown {k} {sorted(bad)}; this model's {k}s are {sorted(known[k])}")
        if layer_set is not None:
            layers = {short_layer(i.layer, i.model) for i in every} | {i.layer for i in every}
            bad = layer_set - layers
            if bad:
                raise ValueError(f"unknown layer {sorted(bad)}; layers are {sorted(layers)}")

    def families(self) -> list[str]:
        """The component families this model has (``ff``, ``attn2``, ``attn_context``, ``text_mlp``, ...), sorted."""
        return sorted({i.rule.family for i in self.modules.values()})

    def layers(self, model: str | None = None) -> list[str]:
        """Layer labels in execution order."""
        seen: dict[str, tuple] = {}
        for i in self.modules.values():
            if model is None or i.model == model:
                seen[short_layer(i.layer, i.model)] = (part_rank(i.model), i.depth)
        return sorted(seen, key=seen.get)


def _unravel(flat: int, shape) -> tuple[int, ...]:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat //= s
    return tuple(reversed(idx))


class ComponentSet(Sequence[Component]):
    """An ordered, duplicate-free list of components: the columns of every mask matrix."""

    def __init__(self, components: Iterable[Component]):
        self._items = list(components)
        if not self._items:
            raise ValueError("the component set is empty: check the family/kind/layer filters")
        addrs = [c.address for c in self._items]
        if len(set(addrs)) != len(addrs):
            dup = sorted({a for a in addrs if addrs.count(a) > 1})[:5]
            raise ValueError(f"duplicate components in the set: {dup}")
        self._pos = {a: i for i, a in enumerate(addrs)}

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ComponentSet(self._items[i])
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def index(self, c: Component | str) -> int:
        """The column of component ``c`` (or its address) in mask matrices; KeyError if absent."""
        return self._pos[str(c)]

    @property
    def addresses(self) -> list[str]:
        """Every component's address, in order."""
        return [c.address for c in self._items]

    @property
    def granularities(self) -> set[str]:
        """The granularities present in the set."""
        return {c.granularity for c in self._items}

    def frame(self):
        """The components as a DataFrame: the left columns of every result table."""
        import pandas as pd

        return pd.DataFrame(
            {
                "component": [c.address for c in self._items],
                "model_part": [c.model for c in self._items],
                "family": [c.family for c in self._items],
                "block": [c.block for c in self._items],
                "layer": [c.layer for c in self._items],
                "depth": [c.depth for c in self._items],
                "kind": [c.kind for c in self._items],
                "unit": [(-1 if c.unit is None else c.unit[0]) if c.granularity != "weight" else c.unit[-1] for c in self._items],
                "granularity": [c.granularity for c in self._items],
            }
        )

    def __repr__(self) -> str:
        return f"ComponentSet({len(self)} components: {', '.join(self.addresses[:3])}{', ...' if len(self) > 3 else ''})"

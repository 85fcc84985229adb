"""Component addresses on the tiny concept-world model: parse/print round trips, counts against module shapes,
errors with suggestions, and filters."""

from __future__ import annotations

import random
import re

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from interp.core.components import ComponentSet, UnknownComponentError

FIELDS = ("model", "module", "param", "unit", "family", "block", "layer", "depth", "kind", "granularity")
MID = "unet.mid_block.attentions.0.transformer_blocks.0"


def fields(c):
    return tuple(getattr(c, f) for f in FIELDS)


def unet_modules(model, cls):
    return [(f"unet.{n}", m) for n, m in model.unet.named_modules() if isinstance(m, cls)]


def test_parse_print_round_trip_of_every_layer_neuron_and_head(tiny_world_model):
    space = tiny_world_model.space
    n = {}
    for g in ("layer", "neuron", "head"):
        comps = list(space.iter(g))
        n[g] = len(comps)
        assert len({c.address for c in comps}) == len(comps)
        for c in comps:
            back = space.parse(c.address)
            assert str(back) == c.address == back.address
            assert back == c and fields(back) == fields(c)
            assert back.granularity == g
            assert back.model in ("unet", "text_encoder") and c.module.startswith(back.model + ".")
            tiny_world_model.module(c.module)  # the module path is real
    # both parts of the model are covered
    for g in ("layer", "neuron", "head"):
        assert space.count(g, model="unet") > 0 and space.count(g, model="text_encoder") > 0
        assert space.count(g, model="unet") + space.count(g, model="text_encoder") == n[g]


def test_weight_addresses_round_trip_and_point_at_the_scalar(tiny_world_model):
    space, rng = tiny_world_model.space, random.Random(0)
    infos = [i for i in space.modules.values() if "weight" in i.rule.granularities]
    assert {i.model for i in infos} == {"unet", "text_encoder"}
    total = 0
    for info in infos:
        for pname, p in info.module.named_parameters(recurse=False):
            total += p.numel()
            for _ in range(3):
                idx = tuple(rng.randrange(s) for s in p.shape)
                addr = f"{info.path}.{pname}[{','.join(map(str, idx))}]"
                c = space.parse(addr)
                assert str(c) == addr and c.granularity == "weight" and c.param == pname and c.unit == idx
                assert getattr(tiny_world_model.module(c.module), c.param)[c.unit] is not None
                assert torch.equal(getattr(tiny_world_model.module(c.module), c.param)[c.unit], p[idx])
    assert space.count("weight") == total
    # enumeration of one small module's weights is complete and in row-major order
    to_k = list(space.iter("weight", layer="mid.a0.tb0", kind="attn2.to_k"))
    w = tiny_world_model.module(f"{MID}.attn2.to_k").weight
    assert len(to_k) == w.numel()
    assert [c.unit for c in to_k[:3]] == [(0, 0), (0, 1), (0, 2)]


def test_counts_match_module_shapes(tiny_world_model):
    m, space = tiny_world_model, tiny_world_model.space
    blocks = unet_modules(m, BasicTransformerBlock)
    assert len(blocks) == 7 == space.count("layer", kind="transformer_block")
    # GEGLU hidden units: the input features of ff.net.2
    assert space.count("neuron", kind="ff.net.0") == sum(b.ff.net[2].in_features for _, b in blocks)
    assert space.count("neuron", kind="ff.net.0.proj") == sum(b.ff.net[0].proj.out_features for _, b in blocks)
    assert space.count("neuron", kind="ff.net.2") == sum(b.ff.net[2].out_features for _, b in blocks)
    assert space.count("neuron", kind="attn2.to_k") == sum(b.attn2.to_k.out_features for _, b in blocks)
    # heads: diffusers Attention.heads plus CLIP's num_heads
    attn = unet_modules(m, Attention)
    clip_attn = [mod for n, mod in m.text_encoder.named_modules() if n.endswith("self_attn")]
    assert len(attn) == 14 and len(clip_attn) == 3
    assert space.count("head", model="unet") == sum(a.heads for _, a in attn)
    assert space.count("head", model="text_encoder") == sum(a.num_heads for a in clip_attn)
    assert space.count("head") == sum(a.heads for _, a in attn) + sum(a.num_heads for a in clip_attn)
    # conv channels
    resnets = unet_modules(m, ResnetBlock2D)
    assert space.count("layer", kind="resnet") == len(resnets)
    assert space.count("neuron", kind="conv1") == sum(r.conv1.out_channels for _, r in resnets)
    assert space.count("neuron", kind="conv2") == sum(r.conv2.out_channels for _, r in resnets)
    # text encoder
    layers = [mod for n, mod in m.text_encoder.named_modules() if re.fullmatch(r"(text_model\.)?encoder\.layers\.\d+", n)]
    assert len(layers) == 3
    assert space.count("layer", family="text_layer") == len(layers)
    assert space.count("neuron", kind="mlp.fc1") == sum(l.mlp.fc1.out_features for l in layers)
    assert space.count("neuron", kind="self_attn.out_proj") == sum(l.self_attn.out_proj.out_features for l in layers)
    # weights: every parameter of every weight-granularity module
    assert space.count("weight", kind="ff.net.2") == sum(
        b.ff.net[2].weight.numel() + b.ff.net[2].bias.numel() for _, b in blocks)


def test_layers_are_in_execution_order(tiny_world_model):
    m = tiny_world_model
    order = []
    handles = [mod.register_forward_pre_hook(lambda mod, a, n=n: order.append(n))
               for n, mod in unet_modules(m, BasicTransformerBlock)]
    try:
        with torch.no_grad():
            ctx = m.text_encoder(torch.zeros(1, 16, dtype=torch.long))[0]
            m.unet(torch.zeros(1, 3, 16, 16), torch.tensor([10]), encoder_hidden_states=ctx)
    finally:
        for h in handles:
            h.remove()
    comps = m.components("layer", kind="transformer_block")
    assert [c.module for c in comps] == order
    assert [c.depth for c in comps] == sorted(c.depth for c in comps)
    assert "mid" in m.space.layers()[m.space.layers().index("mid.a0.tb0")] and \
        m.space.layers().index("mid.a0.tb0") < m.space.layers().index("up0.a0.tb0")
    # text encoder first, then the UNet
    all_layers = list(m.space.iter("layer"))
    parts = [c.model for c in all_layers]
    assert parts == sorted(parts, key=lambda p: p != "text_encoder")


def test_unknown_address_suggests_a_near_one(tiny_world_model):
    space = tiny_world_model.space
    with pytest.raises(UnknownComponentError) as info:
        space.parse(f"{MID}.ff.net.3")
    msg = str(info.value)
    assert "Did you mean" in msg and (f"{MID}.ff.net.2" in msg or f"{MID}.ff.net.0" in msg)
    assert isinstance(info.value, KeyError) and not msg.startswith('"')  # not KeyError's quoting
    with pytest.raises(UnknownComponentError, match="Did you mean.*attn2"):
        space.parse("unet.mid_block.attentions.0.transformer_blocks.0.atn2")
    with pytest.raises(UnknownComponentError, match="not a component address"):
        space.parse("unet.mid_block..ff[")
    with pytest.raises(UnknownComponentError, match="prefixes"):
        space.parse("vae.decoder.conv_in")


def test_out_of_range_indices_are_refused(tiny_world_model):
    space = tiny_world_model.space
    n = tiny_world_model.module(f"{MID}.ff.net.2").in_features
    space.parse(f"{MID}.ff.net.0[{n - 1}]")
    heads = tiny_world_model.module(f"{MID}.attn2").heads
    ch = tiny_world_model.module("unet.down_blocks.1.resnets.0.conv1").out_channels
    refused = [  # (address, what the error must say; "" = any UnknownComponentError)
        (f"{MID}.ff.net.0[{n}]", rf"indices 0\.\.{n - 1}"),
        (f"{MID}.attn2[{heads}]", "heads"),
        (f"unet.down_blocks.1.resnets.0.conv1[{ch}]", ""),
        (f"{MID}.ff.net.2.weight[0]", "needs 2 indices"),
        (f"{MID}.ff.net.2.weight[0,{n}]", "needs 2 indices"),
        (f"{MID}.ff.net.0[1,2]", ""),
        # granularities a module does not have
        (f"{MID}[0]", "no neuron units"),
        (f"{MID}.ff.net.0.weight[0,0]", "no scalar-weight"),
        (f"{MID}.attn2.to_q.bias[0]", ""),  # diffusers' to_q has no bias
    ]
    for address, match in refused:
        with pytest.raises(UnknownComponentError, match=match):
            space.parse(address)


def test_filters_select_the_right_subsets(tiny_world_model):
    space = tiny_world_model.space
    ff = space.select("neuron", family="ff")
    assert {c.family for c in ff} == {"ff"}
    assert len(ff) == sum(space.count("neuron", kind=k) for k in ("ff.net.0", "ff.net.0.proj", "ff.net.2"))
    mid = space.select("neuron", block="mid_block")
    assert {c.block for c in mid} == {"mid_block"} and all(c.module.startswith("unet.mid_block.") for c in mid)
    assert len(mid) + space.count("neuron", block=[b for b in
                                                   {i.block for i in space.modules.values()} if b != "mid_block"]) \
        == space.count("neuron")
    tb = space.select("neuron", layer="mid.a0.tb0")
    assert all(c.module.startswith(MID + ".") for c in tb) and {c.layer for c in tb} == {"mid.a0.tb0"}
    assert tb.addresses == space.select("neuron", layer="mid_block.attentions.0.transformer_blocks.0").addresses
    text = space.select("layer", model="text_encoder")
    assert {c.model for c in text} == {"text_encoder"} and all(c.module.startswith("text_encoder.") for c in text)
    both = space.count("head", family=("attn1", "attn2"))
    assert both == space.count("head", family="attn1") + space.count("head", family="attn2")
    combo = space.select("neuron", family="ff", kind="ff.net.0", layer=["mid.a0.tb0", "up0.a0.tb0"])
    n = tiny_world_model.module(f"{MID}.ff.net.2").in_features
    assert len(combo) == 2 * n and {c.kind for c in combo} == {"ff.net.0"}
    assert space.count("weight", kind="ff.net.2", block="mid_block") == sum(
        p.numel() for p in tiny_world_model.module(f"{MID}.ff.net.2").parameters())
    assert set(space.families()) == {"attn1", "attn2", "block", "ff", "resnet", "text_attn", "text_layer", "text_mlp"}
    # model.components is the same selection
    assert tiny_world_model.components("neuron", family="ff", kind="ff.net.0").addresses == \
        space.select("neuron", family="ff", kind="ff.net.0").addresses


@pytest.mark.parametrize("filters", [{"family": "fff"}, {"kind": "ff.net.9"}, {"block": "middle"},
                                     {"layer": "mid.a9.tb0"}, {"model": "vae"}])
def test_unknown_filter_values_are_refused(tiny_world_model, filters):
    (key, value), = filters.items()
    with pytest.raises(ValueError, match=f"unknown {key}") as info:
        tiny_world_model.space.select("neuron", **filters)
    assert value in str(info.value)
    with pytest.raises(ValueError, match=f"unknown {key}"):
        tiny_world_model.space.count("neuron", **filters)


def test_unknown_filter_value_is_refused_when_counting_weights(tiny_world_model):
    with pytest.raises(ValueError, match="unknown family"):
        tiny_world_model.space.count("weight", family="fff")


def test_bad_granularity_and_empty_or_duplicate_sets(tiny_world_model):
    space = tiny_world_model.space
    with pytest.raises(ValueError, match="granularity"):
        space.select("channel")
    with pytest.raises(ValueError, match="empty"):
        space.select("head", family="resnet")
    c = space.parse(f"{MID}.ff.net.0[3]")
    with pytest.raises(ValueError, match="duplicate"):
        ComponentSet([c, space.parse(f"{MID}.ff.net.0[3]")])
    cs = ComponentSet([c, space.parse(f"{MID}.attn2[1]")])
    assert cs.index(f"{MID}.attn2[1]") == 1 and cs.granularities == {"neuron", "head"}
    frame = cs.frame()
    assert list(frame["component"]) == cs.addresses and list(frame["unit"]) == [3, 1]
    assert list(frame["layer"]) == ["mid.a0.tb0", "mid.a0.tb0"]

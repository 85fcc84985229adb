"""The concept world: renderer, labels, captions, tokenizer, pipeline round trip, training (and resuming it), and
the concept classifier."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import skip_unless_ci

from interp.world import vocab
from interp.world.classifier import ConceptClassifier, accuracy, train_classifier
from interp.world.model import ConceptWorldPipeline, ModelConfig, build_pipeline
from interp.world.render import RGB, ConceptWorld, Scene, render
from interp.world.train import TrainConfig, train
from interp.world.vocab import ATTRIBUTES, OutOfVocabularyError, build_tokenizer, check_prompts, words_of


# -- renderer ---------------------------------------------------------------------------------------------------
def test_renderer_is_deterministic_per_seed_and_index():
    a, b = ConceptWorld(12, seed=3), ConceptWorld(12, seed=3)
    for i in range(12):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["attributes"] == y["attributes"]
        assert torch.equal(x["labels"], y["labels"])
    assert a[0]["image"].shape == (3, 16, 16) and a[0]["image"].dtype == torch.float32
    # different indices (and different seeds) give different images
    images = [a[i]["image"] for i in range(12)]
    assert all(not torch.equal(images[i], images[j]) for i in range(12) for j in range(i + 1, 12))
    assert not torch.equal(ConceptWorld(1, seed=4)[0]["image"], a[0]["image"])
    # images are in [0, 1]; the renderer itself is a pure function of the scene
    assert all(float(im.min()) >= 0.0 and float(im.max()) <= 1.0 for im in images)
    s = a.scene(5)
    assert np.array_equal(render(s), render(s))
    assert torch.equal(torch.from_numpy(render(s)), a[5]["image"])


def test_dataset_bounds_and_validation():
    w = ConceptWorld(3, seed=0)
    with pytest.raises(IndexError, match="^3$"):  # (the index alone: IndexError's usual message)
        w[3]
    with pytest.raises(IndexError, match="^-1$"):
        w[-1]
    with pytest.raises(ValueError, match="needs n > 0 images, got 0"):
        ConceptWorld(0)
    with pytest.raises(ValueError, match="not a color"):
        ConceptWorld(2, color="magenta")
    with pytest.raises(KeyError, match="unknown attribute"):
        ConceptWorld(2, material="wood")


def test_labels_match_scene_attributes():
    w = ConceptWorld(60, seed=11)
    seen = {a: set() for a in ATTRIBUTES}
    for i in range(len(w)):
        item = w[i]
        assert item["attributes"] == w.scene(i).attributes()
        for j, (a, values) in enumerate(ATTRIBUTES.items()):
            assert values[int(item["labels"][j])] == item["attributes"][a]
            seen[a].add(item["attributes"][a])
    # 60 uniform draws cover every value of every attribute (a sampler stuck on one value would fail)
    assert all(seen[a] == set(v) for a, v in ATTRIBUTES.items())


def test_pinned_attributes_are_respected():
    w = ConceptWorld(20, seed=2, color="cyan", shape="cross")
    for i in range(len(w)):
        assert w[i]["attributes"]["color"] == "cyan" and w[i]["attributes"]["shape"] == "cross"


@pytest.mark.parametrize("background,bright", [("white", True), ("black", False)])
def test_background_pixels(background, bright):
    w = ConceptWorld(25, seed=5, background=background)
    for i in range(len(w)):
        img = w[i]["image"]
        corners = img[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (3, 4)
        if bright:
            assert float(corners.min()) > 0.95, (i, w[i]["attributes"])
        else:
            assert float(corners.max()) < 0.05, (i, w[i]["attributes"])


@pytest.mark.parametrize("color", ["red", "green", "blue"])
def test_solid_object_color_at_center(color):
    channel = {"red": 0, "green": 1, "blue": 2}[color]
    w = ConceptWorld(25, seed=6, color=color, texture="solid")
    for i in range(len(w)):
        s = w.scene(i)
        img = w[i]["image"]
        px = img[:, 8 + s.dy, 8 + s.dx]  # the pixel just below/right of the object's center
        expected = torch.tensor(RGB[color]) + torch.tensor(s.tint)
        assert torch.allclose(px, expected.clamp(0, 1), atol=1e-5), (i, px, s)
        others = [c for c in range(3) if c != channel]
        assert all(float(px[channel]) > float(px[c]) + 0.3 for c in others)


def test_textures_differ_on_the_same_scene():
    base = Scene("red", "square", "solid", "black", radius=5.5)
    solid = render(base)
    striped = render(Scene("red", "square", "striped", "black", radius=5.5))
    hollow = render(Scene("red", "square", "hollow", "black", radius=5.5))
    # striped removes every third row inside the object; hollow removes the interior
    assert striped.sum() < solid.sum() and hollow.sum() < solid.sum()
    assert solid[0, 8, 8] > 0.8 and hollow[0, 8, 8] < 0.05
    with pytest.raises(ValueError, match="texture"):
        render(Scene("red", "square", "dotted", "black"))
    with pytest.raises(ValueError, match="shape"):
        render(Scene("red", "hexagon", "solid", "black"))


# -- captions and vocabulary -------------------------------------------------------------------------------------
def test_captions_contain_the_attribute_words():
    w = ConceptWorld(40, seed=7)
    for i in range(len(w)):
        item = w[i]
        words = words_of(item["caption"])
        for value in item["attributes"].values():
            assert value in words, (item["caption"], item["attributes"])
        check_prompts(item["caption"])  # every caption word is in the vocabulary
        assert len(words) + 2 <= vocab.MAX_LENGTH


def test_captions_with_omitted_words_stay_in_vocabulary():
    w = ConceptWorld(60, seed=8, p_omit=0.5)
    caps = [w[i]["caption"] for i in range(len(w))]
    check_prompts(caps)
    # with p_omit=0.5 some attribute words are missing from some captions
    missing = sum(v not in words_of(c) for c, i in zip(caps, range(len(w))) for v in w[i]["attributes"].values())
    assert missing > 0
    assert vocab.caption({"color": None, "shape": None, "texture": None, "background": None}, template=2) == "an image of a shape"


@pytest.mark.parametrize("template", [0, 1, 3])
def test_caption_without_background_has_no_dangling_on(template):
    text = vocab.caption({"color": "red", "shape": "circle", "texture": "solid", "background": None}, template)
    assert not text.endswith(" on"), text


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    prompts = ["a red solid circle on white", "", "an image of a striped blue cross on a black background",
               "A Photo of a GREEN, hollow diamond."]
    ids = tok(prompts, padding="max_length", max_length=vocab.MAX_LENGTH).input_ids
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back(prompts, padding="max_length", max_length=vocab.MAX_LENGTH).input_ids == ids
    assert back.get_vocab() == tok.get_vocab()
    assert back.pad_token == vocab.PAD and back.model_max_length == vocab.MAX_LENGTH
    v = vocab.vocabulary()
    assert ids[1][:2] == [v.index(vocab.BOS), v.index(vocab.EOS)]  # empty prompt: BOS EOS then padding
    assert ids[0][1:3] == [v.index("a"), v.index("red")]
    assert ids[3] == tok(["a photo of a green hollow diamond"], padding="max_length",
                         max_length=vocab.MAX_LENGTH).input_ids[0]  # case and punctuation are normalized


def test_out_of_vocabulary_prompt_is_refused():
    with pytest.raises(OutOfVocabularyError) as info:
        check_prompts(["a red circle", "a zebra on a skateboard"])
    msg = str(info.value)
    assert "'zebra'" in msg and "'skateboard'" in msg
    assert "circle" in msg and "striped" in msg and "background" in msg  # lists the vocabulary
    assert "'red'" not in msg.split("The vocabulary")[0]  # known words are not named as unknown
    assert isinstance(info.value, ValueError)
    # the pipeline refuses them too, before running anything
    pipe = build_pipeline(ModelConfig.tiny(), seed=0)
    with pytest.raises(OutOfVocabularyError, match="zebra"):
        pipe("a zebra", num_inference_steps=1)


def test_empty_and_overlong_prompt_lists_are_refused():
    with pytest.raises(ValueError, match="empty"):
        check_prompts([])
    with pytest.raises(ValueError, match="at most"):
        check_prompts(" ".join(["red"] * 20))
    with pytest.raises(TypeError, match="prompts must be strings, got int: 3"):
        check_prompts([3])
    pipe = build_pipeline(ModelConfig.tiny(), seed=0)
    with pytest.raises(ValueError, match="empty"):
        pipe([], num_inference_steps=1)


def test_attribute_of():
    assert vocab.attribute_of("striped") == "texture"
    with pytest.raises(KeyError, match="concept words"):
        vocab.attribute_of("zebra")


# -- pipeline -----------------------------------------------------------------------------------------------------
def test_pipeline_round_trip_offline(tmp_path, monkeypatch):
    import interp

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = build_pipeline(ModelConfig.tiny(), seed=0)
    prompts = ["a red solid circle on white", "a blue striped cross on black"]

    def sample(p, seed):
        return p(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(seed))

    a = sample(pipe, 0)
    assert a.shape == (2, 3, 16, 16) and float(a.min()) >= 0 and float(a.max()) <= 1
    pipe.save_pretrained(tmp_path / "pipe")
    back = ConceptWorldPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(back, ConceptWorldPipeline)
    assert torch.equal(sample(back, 0), a)
    assert torch.equal(sample(pipe, 0), a)  # sampling is a pure function of the seed
    assert not torch.equal(sample(pipe, 1), a)
    for (n1, p1), (n2, p2) in zip(pipe.unet.state_dict().items(), back.unet.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # the suite loads the folder offline and recognizes the concept world
    m = interp.load_model(str(tmp_path / "pipe"))
    assert m.is_concept_world and m.classifier is None
    assert torch.equal(interp.generate(m, prompts[:1], seed=0, steps=2), interp.generate(m, prompts[:1], seed=0, steps=2))


# -- training -------------------------------------------------------------------------------------------------------
def _cfg(**kw) -> TrainConfig:
    base = dict(model=ModelConfig.tiny(), steps=30, batch_size=16, log_every=5, save_every=1000, warmup=5)
    return TrainConfig(**{**base, **kw})


def test_short_training_lowers_the_loss(tmp_path):
    pipe, history = train(_cfg(), tmp_path, progress=False)
    assert [h["step"] for h in history] == [5, 10, 15, 20, 25, 30]
    losses = [h["loss"] for h in history]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    # no training state is left behind when the run finishes without a checkpoint step
    assert not (tmp_path / "train_state.pt").exists()
    assert not pipe.unet.training
    # the returned weights are exactly float16-representable (the shipped precision)
    w = next(pipe.unet.parameters())
    assert w.dtype == torch.float32 and torch.equal(w, w.half().float())


@pytest.mark.slow  # several seconds: a kill-and-resume training
def test_interrupted_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    import interp.world.train as train_mod

    cfg = _cfg(steps=20, save_every=10)
    ref_pipe, ref_hist = train(cfg, tmp_path / "ref", progress=False)

    class Killed(Exception):
        pass

    real = train_mod.render_batch
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 16:  # step 15: after the checkpoint at step 10
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "render_batch", dying)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(train_mod, "render_batch", real)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    assert state["step"] == 10 and [h["step"] for h in state["history"]] == [5, 10]
    assert state["config_hash"] == cfg.hash()

    calls["n"] = 0
    monkeypatch.setattr(train_mod, "render_batch", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), real(*a, **k))[1])
    pipe, hist = train(cfg, tmp_path / "run", progress=False)
    assert calls["n"] == 10  # only the remaining 10 steps ran
    assert [h["step"] for h in hist] == [5, 10, 15, 20]
    # the resumed run is the uninterrupted run: same losses and same final (EMA) weights
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist], rtol=1e-6, atol=0)
    for (n, p), (_, q) in zip(pipe.unet.named_parameters(), ref_pipe.unet.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_training_state_of_another_config_is_ignored(tmp_path, caplog):
    train(_cfg(steps=12, save_every=5), tmp_path, progress=False)  # leaves a state at step 10
    assert torch.load(tmp_path / "train_state.pt", weights_only=False)["step"] == 10
    with caplog.at_level(logging.WARNING, logger="interp.world.train"):
        _, hist = train(_cfg(steps=6, save_every=1000), tmp_path, progress=False)
    assert [h["step"] for h in hist] == [5, 6]  # started from scratch
    assert any("another training config" in r.message for r in caplog.records)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps and batch_size must be positive, got 0 and"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"caption_dropout must be in \[0, 1\), got 1\.0"):
        TrainConfig(caption_dropout=1.0)
    assert _cfg().hash() == _cfg().hash() and _cfg().hash() != _cfg(seed=1).hash()


# -- classifier ------------------------------------------------------------------------------------------------------
def test_classifier_save_load_and_probabilities(tmp_path):
    torch.manual_seed(0)
    clf = ConceptClassifier(width=8)
    clf(torch.zeros(1, 3, 16, 16))
    clf.save(tmp_path, metrics={"color": 0.5})
    back = ConceptClassifier.load(tmp_path)
    assert back.width == 8 and not back.training
    assert all(not p.requires_grad for p in back.parameters())
    for (n, p), (m, q) in zip(clf.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(p, q)
    images = torch.stack([ConceptWorld(6, seed=1)[i]["image"] for i in range(6)])
    probs = back.predict(images)
    assert set(probs) == set(ATTRIBUTES)
    for a, p in probs.items():
        assert p.shape == (6, len(ATTRIBUTES[a]))
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(6), rtol=0, atol=1e-6)
    clf.eval()
    with torch.no_grad():
        for a, out in clf(images).items():
            torch.testing.assert_close(back(images)[a], out)
    p_red = back.concept_probability(images, "color", "red")
    torch.testing.assert_close(p_red, probs["color"][:, 0])
    with pytest.raises(FileNotFoundError, match="no concept classifier"):
        ConceptClassifier.load(tmp_path / "nothing")


def test_classifier_training_smoke():
    model, acc = train_classifier(steps=2, batch_size=8, n_test=10, progress=False)
    assert set(acc) == set(ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in acc.values())
    assert not model.training


def test_shipped_classifier_accuracy():
    from interp.world.plugin import ASSETS

    folder = ASSETS / "concept-world"
    if not (folder / "classifier.json").exists():
        skip_unless_ci(f"no shipped classifier at {folder / 'classifier.json'} (the concept world has not been "
                       f"trained and shipped yet: `python -m analyses.train_world`)")
    clf = ConceptClassifier.load(folder)
    acc = accuracy(clf, ConceptWorld(300, seed=4242))
    assert all(v >= 0.98 for v in acc.values()), acc


def test_shipped_checkpoint_loads_and_its_fidelity_is_what_it_claims():
    """The shipped model loads by name; its fidelity JSON is reproduced on a sample of the same held-out prompts.

    Targets of the foundation issue: color >= 0.95, shape >= 0.90, texture >= 0.85, background >= 0.95. The JSON's
    training configuration is the training command's default, so ``python -m analyses.train_world`` reproduces it.
    """
    import json

    import interp
    from interp.world.fidelity import measure_fidelity
    from interp.world.plugin import ASSETS

    folder = ASSETS / "concept-world"
    if not (folder / "fidelity.json").exists():
        skip_unless_ci(f"no shipped checkpoint at {folder}")
    claimed = json.loads((folder / "fidelity.json").read_text())
    acc = claimed["accuracy"]
    assert acc["color"] >= 0.95 and acc["shape"] >= 0.90 and acc["texture"] >= 0.85 and acc["background"] >= 0.95
    assert claimed["targets"] == {"color": 0.95, "shape": 0.90, "texture": 0.85, "background": 0.95}
    from dataclasses import asdict

    from interp.world.train import TrainConfig

    trained = json.loads((folder / "train_config.json").read_text())["config"]
    assert trained == json.loads(json.dumps(asdict(TrainConfig()))), "the shipped model is not the default recipe"
    model = interp.load_model("concept-world")
    assert model.is_concept_world and model.classifier is not None
    # The first 60 of the same held-out prompts, seeds and sampler: the same images as the JSON's first batch.
    again, _ = measure_fidelity(model, n=60, seed=claimed["seed"], steps=claimed["steps"],
                                guidance=claimed["guidance"], batch=60)
    for a in ("color", "shape", "texture", "background"):
        assert again["accuracy"][a] >= acc[a] - 0.1, (a, again["accuracy"][a], acc[a])

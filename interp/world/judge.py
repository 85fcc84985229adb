"""The concept world's concept classifier as an image judge (:class:`interp.core.judges.Judge`), registered with the
core by the world plugin (:func:`interp.core.judges.register_judge_kind`) as the judge its models carry."""

from __future__ import annotations

import torch

from interp.core.judges import Judge, _resize, concept_target
from interp.world.vocab import ATTRIBUTES, attribute_of


class ClassifierJudge(Judge):
    """The concept world's concept classifier as a judge; images are resized to its 16x16 input."""

    def __init__(self, classifier, name: str = "classifier", size: int = 16):
        self.classifier, self.name, self.size = classifier, name, size

    def _dtype(self):
        return next(self.classifier.parameters()).dtype

    def _device(self):
        return next(self.classifier.parameters()).device

    def _prep(self, images):
        return _resize(images, (self.size, self.size)).to(self._device(), self._dtype())

    def check(self, concept):
        """The attribute of ``concept``'s value (the classifier's head that scores it).

        Raises:
            ValueError: the value is not one the classifier knows.
        """
        value, attribute, _ = concept_target(concept)
        try:
            return attribute or attribute_of(value)
        except KeyError as err:
            raise ValueError(f"the concept classifier cannot judge {value!r}: {err.args[0]}. On another model use "
                             f"a CLIP judge (judge='concept-world-clip', a CLIPModel folder or a hub id)") from None

    def probability(self, images, concept):
        """``(N,)`` probability the classifier gives ``concept``'s value on each image; differentiable."""
        value = concept_target(concept)[0]
        return self.classifier.concept_probability(self._prep(images), self.check(concept), value)

    def predict(self, images, attribute_values):
        """Per attribute, ``(N, n_values)`` probabilities over the given values (renormalized over them)."""
        with torch.no_grad():
            probs = self.classifier.predict(self._prep(images))
        out = {}
        for a, values in attribute_values.items():
            if a not in ATTRIBUTES:
                raise ValueError(f"the concept classifier has no attribute {a!r}; it judges {list(ATTRIBUTES)}")
            unknown = [v for v in values if v not in ATTRIBUTES[a]]
            if unknown:
                raise ValueError(f"the concept classifier knows no {a} {unknown}; its {a}s are {ATTRIBUTES[a]}")
            if tuple(values) == ATTRIBUTES[a]:
                out[a] = probs[a]
            else:  # a subset or another order: the classifier's distribution restricted to those values
                p = probs[a][:, [ATTRIBUTES[a].index(v) for v in values]]
                out[a] = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        return out

    def features(self, images):
        """``(N, D)`` float64 features: the classifier's trunk output (for Fréchet distances)."""
        with torch.no_grad():  # the trunk's output, with the classifier's own input normalization
            return self.classifier.trunk(self._prep(images) * 2 - 1).double().cpu().numpy()

    def to(self, device):
        """Move the classifier to ``device``; returns this judge."""
        self.classifier.to(device)
        return self

"""Choosing the image classifier that scores decoded images, from ``evaluate.classifier``."""

from __future__ import annotations

from mindvis.config import section_settings
from mindvis.errors import MindvisError
from mindvis.models.classifiers import imagenet
from mindvis.models.classifiers.domain import domain_image_classifier


def load_image_classifier(config, classifier_dir=None):
    """The image classifier named by ``evaluate.classifier``, ready to score images.

    Parameters
    ----------
    config : dict
        Experiment config; reads ``evaluate.classifier`` (``auto``: the domain
        classifier for the simulated data set, else EfficientNet-Lite0),
        ``evaluate.classifier_weights`` (ViT-H/14) and ``data.source``.
    classifier_dir : str or Path, optional
        The trained domain classifier's folder (``results/classifier``);
        needed for ``domain``.

    Returns
    -------
    ImageClassifier

    Raises
    ------
    MindvisError
        When the chosen classifier cannot be loaded, with the key and the fix.
    """
    settings = section_settings(config, "evaluate")
    choice = settings["classifier"]
    if choice == "auto":
        source = (config.get("data") or {}).get("source", "simulated")
        choice = "domain" if source == "simulated" else "efficientnet_lite0"
    if choice == "domain":
        if classifier_dir is None:
            raise MindvisError("the domain classifier needs its folder (classifier_dir)", key="evaluate.classifier",
                               fix="pass the train_classifier output (results/classifier), or choose "
                                   "efficientnet_lite0.")
        return domain_image_classifier(classifier_dir)
    if choice == "efficientnet_lite0":
        return imagenet.load_efficientnet_lite0()
    if choice == "vit_h_14":
        return imagenet.load_vit_h_14(settings["classifier_weights"])
    raise MindvisError(f"unknown classifier {choice!r}", key="evaluate.classifier",
                       fix="use auto, domain, efficientnet_lite0 or vit_h_14.")

"""Image classifiers behind the evaluation: the domain classifier's wrapper, EfficientNet-Lite0, ViT-H/14 errors."""

import json

import numpy as np
import pytest
import torch

from mindvis.config import validate
from mindvis.errors import MindvisError
from mindvis.models.classifiers.base import ImageClassifier
from mindvis.models.classifiers.domain import DomainClassifier
from mindvis.models.classifiers.load import load_image_classifier


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory):
    """An (untrained, seeded) domain classifier saved as train_classifier saves one."""
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    model = DomainClassifier(image_size=16, in_channels=1, n_classes=3, widths=(4, 8))
    model.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"class_names": ["shirt", "bag", "boot"], "val_accuracy": 0.5}))
    return folder


@pytest.fixture(scope="module")
def efficientnet():
    from mindvis.models.classifiers.imagenet import load_efficientnet_lite0

    return load_efficientnet_lite0(batch_size=4)


def test_auto_picks_the_domain_classifier_for_the_simulation(domain_dir):
    classifier = load_image_classifier(validate({}), domain_dir)
    assert isinstance(classifier, ImageClassifier)
    assert (classifier.name, classifier.n_classes, classifier.class_names) == ("domain", 3, ["shirt", "bag", "boot"])
    assert classifier.info["val_accuracy"] == 0.5
    images = np.random.default_rng(0).integers(0, 256, size=(5, 20, 24, 1), dtype=np.uint8)
    probs, features = classifier.predict_proba(images), classifier.features(images)
    assert probs.dtype == features.dtype == np.float32
    assert probs.shape == (5, 3) and features.shape == (5, 8)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # The same numbers as the network's own scoring, and its head applied to these features.
    model = classifier.network
    np.testing.assert_allclose(probs, model.predict_proba(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features, model.embed(images), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        from_features = torch.softmax(model.head(torch.from_numpy(features)), 1).numpy()
    np.testing.assert_allclose(from_features, probs,
                               rtol=1e-5, atol=1e-6)
    empty = classifier.predict_proba_and_features(images[:0])
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 8)


def test_domain_classifier_needs_its_folder(tmp_path):
    with pytest.raises(MindvisError, match="classifier_dir"):
        load_image_classifier(validate({"evaluate": {"classifier": "domain"}}))
    with pytest.raises(MindvisError, match="train-classifier"):
        load_image_classifier(validate({"evaluate": {"classifier": "domain"}}), tmp_path)


def test_vit_h_14_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(MindvisError, match="evaluate.classifier_weights") as info:
        load_image_classifier(validate({"evaluate": {"classifier": "vit_h_14"}}))
    assert "efficientnet_lite0" in str(info.value)
    with pytest.raises(MindvisError, match="does not exist"):
        load_image_classifier(validate({"evaluate": {"classifier": "vit_h_14",
                                                     "classifier_weights": str(tmp_path / "none.pth")}}))
    junk = tmp_path / "vit.pth"
    junk.write_bytes(b"not a state dict")
    # Without torchvision (as here, beside the CPU torch build) or with it (then the file cannot be read).
    with pytest.raises(MindvisError, match="torchvision|cannot read"):
        load_image_classifier(validate({"evaluate": {"classifier": "vit_h_14", "classifier_weights": str(junk)}}))


def test_imagenet_class_names_are_the_1000_classes():
    from mindvis.models.classifiers.imagenet import imagenet_class_names, imagenet_wnids

    names, wnids = imagenet_class_names(), imagenet_wnids()
    assert len(names) == len(set(names)) == 1000
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000  # ImageNet's order: sorted WordNet ids
    assert (names[0], wnids[0], names[281], names[967]) == ("tench", "n01440764", "tabby", "espresso")


def test_efficientnet_lite0_outputs(efficientnet):
    assert efficientnet.name == "efficientnet_lite0" and efficientnet.n_classes == 1000
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 40, 40, 3), dtype=np.uint8)
    probs, features = efficientnet.predict_proba_and_features(images)
    assert probs.shape == (5, 1000) and features.shape == (5, efficientnet.n_features) == (5, 1280)
    assert probs.dtype == features.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(efficientnet.features(images[:2]), features[:2], rtol=1e-4, atol=1e-5)


def _stripes_and_checks(size=64):
    """Clearly structured synthetic images: vertical stripes, horizontal stripes, checkerboards, grey."""
    y, x = np.mgrid[:size, :size]
    patterns = [(x // 4) % 2, (y // 4) % 2, ((x // 8) + (y // 8)) % 2, ((x // 4) + (y // 4)) % 2]
    return (np.stack(patterns) * 255).astype(np.uint8)[..., None]


def test_efficientnet_lite0_classifies_structured_images_consistently(efficientnet):
    grey = _stripes_and_checks()
    probs = efficientnet.predict_proba(grey)
    assert probs.max(axis=1).min() > 0.02  # 20 x chance (0.001) on every pattern
    top = [efficientnet.class_names[index] for index in probs.argmax(axis=1)]
    assert top[0] == "radiator" and top[1] == "window shade" and top[3] == "window screen"
    np.testing.assert_array_equal(probs, efficientnet.predict_proba(grey))  # deterministic
    # Grey input is the same image as its three-channel copy; batches do not mix.
    # (float32 through 2 OpenMP threads: a different memory layout may round differently, ~1e-6.)
    np.testing.assert_allclose(efficientnet.predict_proba(np.repeat(grey, 3, axis=-1)), probs, rtol=1e-4, atol=1e-6)
    one_by_one = np.concatenate([efficientnet.predict_proba(image[None]) for image in grey])
    np.testing.assert_allclose(one_by_one, probs, rtol=1e-4, atol=1e-6)
    # A transposed pattern (vertical <-> horizontal stripes) is seen as a different image.
    assert not np.allclose(probs[0], probs[1], atol=1e-3)


def test_efficientnet_lite0_recognises_natural_photographs(efficientnet):
    data = pytest.importorskip("skimage.data")  # photographs shipped inside scikit-image (test extra)
    cat, coffee = data.chelsea(), data.coffee()
    top = [int(efficientnet.predict_proba(image[None]).argmax()) for image in (cat, coffee)]
    names = efficientnet.class_names
    assert names[top[0]] in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert names[top[1]] in {"espresso", "cup", "coffee mug"}


def test_auto_picks_efficientnet_for_natural_image_sources():
    config = validate({"data": {"source": "god_npz"}})
    assert load_image_classifier(config).name == "efficientnet_lite0"


def test_train_classifier_reads_the_classifier_section(tmp_path):
    from ldm_fixtures import write_synthetic_stimuli

    from mindvis.config import load_schema
    from mindvis.train.classifier import train_classifier

    write_synthetic_stimuli(tmp_path / "stimuli.h5", n_train_per_class=6)
    config = validate({"seed": 1, "classifier": {"epochs": 1, "widths": [4], "hflip": False}})
    metrics = train_classifier(config, tmp_path / "stimuli.h5", tmp_path / "clf")
    defaults = {key: sub["default"] for key, sub in load_schema()["properties"]["classifier"]["properties"].items()}
    assert metrics["settings"] == {**defaults, "epochs": 1, "widths": [4], "hflip": False}
    assert load_image_classifier(config, tmp_path / "clf").n_features == 4
    # A section given only in part (as a Python caller may) gets the schema's defaults too.
    partial = train_classifier({"seed": 1, "classifier": {"epochs": 1, "widths": [2]}}, tmp_path / "stimuli.h5",
                               tmp_path / "clf2")
    assert partial["settings"]["val_fraction"] == defaults["val_fraction"] and partial["settings"]["widths"] == [2]
    with pytest.raises(MindvisError, match="classifier.epoch"):
        validate({"classifier": {"epoch": 3}})

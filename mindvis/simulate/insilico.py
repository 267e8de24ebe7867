"""The public handle on the simulator's ground truth: a subject's encoding model, shown any images.

In-silico experiments (and checks run from outside the package) ask what a
simulated subject's cortex would do with images it never saw in the scanner::

    from mindvis.config import load_config
    from mindvis.simulate import ground_truth

    truth = ground_truth(load_config("configs/default.yaml"), "results/bids/stimuli/stimuli.h5", "sub-01")
    responses, roi = truth.respond(images)      # float32 [N, V] percent signal change, str [V]

The model is rebuilt from the config and the stimulus file exactly as
``mindvis simulate`` built it (same anatomy, tuning, shared maps and
calibration), so ``truth.respond`` of the experiment's own stimuli equals the
``response`` the simulation stored in its ground-truth file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mindvis.errors import MindvisError


@dataclass
class GroundTruth:
    """One simulated subject's noise-free encoding model.

    Attributes
    ----------
    subject : str
    layout : mindvis.simulate.geometry.VoxelLayout
        Where the voxels are (``layout.mni``, ``layout.ijk`` on the acquisition grid).
    model : mindvis.simulate.encoding.EncodingModel
        Calibrated on the experiment's stimuli.
    roi : str [V]
        Each voxel's ROI (V1, V2, V3, LOC, VOT).
    image_size, channels : int
        What the stimuli are; other images are fitted to it as the stimuli were.
    """

    subject: str
    layout: object
    model: object
    roi: np.ndarray
    image_size: int
    channels: int

    def fit_images(self, images):
        """uint8 images ``[N, H, W, C]`` or ``[N, H, W]`` of any size -> ``[N, S, S, channels]`` as the stimuli are.

        Images of the stimuli's size and channels pass unchanged; others are
        made grey (for grey stimuli), padded and resized with
        :func:`mindvis.data.stimuli.fit_image`, as the stimulus set was built.
        """
        from mindvis.data.stimuli import fit_image

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise MindvisError(f"images must be uint8 [N, H, W, C] or [N, H, W], got {images.dtype} "
                               f"{list(images.shape)}", key="images", fix="convert them to uint8 first.")
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[1:] == (self.image_size, self.image_size, self.channels):
            return images
        if self.channels == 1:
            grey = np.round(images.mean(axis=3)).astype(np.uint8)
            return np.stack([fit_image(image, self.image_size, 1) for image in grey])
        images = images if images.shape[3] == self.channels else np.repeat(images[..., :1], self.channels, axis=3)
        return np.stack([np.concatenate([fit_image(image[..., c], self.image_size, 1) for c in range(self.channels)],
                                        axis=2) for image in images])

    def respond(self, images, labels=None):
        """Noise-free evoked responses of every voxel to each image.

        Parameters
        ----------
        images : uint8 [N, H, W, C] or [N, H, W]
            Any size; fitted as the stimuli were (:meth:`fit_images`).
        labels : int [N], optional
            Needed by the ``labels`` category model only.

        Returns
        -------
        responses : float32 [N, V]
            Peak percent signal change.
        roi : str [V]
        """
        return self.model.predict(self.fit_images(images), labels), self.roi


def ground_truth(config, stimuli_path, subject, features_path=None):
    """Build a task subject's ground-truth encoding model from a config and the stimulus file.

    Parameters
    ----------
    config : dict
        A validated config (:func:`mindvis.config.load_config`).
    stimuli_path : str or Path
        The experiment's stimulus HDF5 (the calibration set).
    subject : str
        A task subject, e.g. ``sub-01``.
    features_path : str or Path, optional
        ``deepnet``: the stimuli's cached network features (computed when not given).

    Returns
    -------
    GroundTruth
    """
    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.simulate import run
    from mindvis.simulate.traits import subject_traits

    run._check_subject(subject, rest=False)
    section = config["simulate"]
    stimuli = load_stimulus_set(stimuli_path, splits=("train", "test"))
    train, test = stimuli["train"], stimuli["test"]
    images = np.concatenate([train.images, test.images])
    labels = np.concatenate([train.label, test.label])
    layout, _ = run._anatomy(config, subject, subject_traits(config, subject))
    model = run.make_subject_model(config, subject, layout, len(stimuli.class_names), train.images)
    features = None
    if section["category_model"] == "deepnet":
        ids = np.concatenate([train.stimulus_id, test.stimulus_id])
        features = run._stimulus_features(config, stimuli_path, features_path, ids, images)
    model.calibrate(images, labels, features)
    return GroundTruth(subject, layout, model, np.asarray(layout.roi_names), int(images.shape[1]),
                       int(images.shape[3]))

"""The goal-driven part of the simulated visual cortex: an ImageNet network's mid and late layers.

Higher visual cortex is predicted far better by the late layers of networks
trained to recognise objects than by hand-made shape or HMAX features (Yamins
et al. 2014, PNAS 111:8619; Khaligh-Razavi & Kriegeskorte 2014, PLoS Comput.
Biol. 10:e1003915; Güçlü & van Gerven 2015, J. Neurosci. 35:10005), and IT is
organised along the principal components of such a network's object space
(Bao, She, McGill & Tsao 2020, Nature 583:103, who used 50 PCs of a deep
network's penultimate layer). The ``deepnet`` category model
(:mod:`mindvis.simulate.encoding`) reads each LOC/VOT voxel out of these
features; this module computes them, once per stimulus set, and caches them.

Two layers are read (:func:`layer_features`):

``mid``
    The last block at output stride 16 (112 channels in EfficientNet-Lite0),
    average-pooled to a 2 x 2 grid: object parts with coarse position, as
    intermediate layers predict LOC (Güçlü & van Gerven 2015, Fig. 4).
``late``
    The head's 1280 channels averaged over the image: the penultimate
    features that predict IT and VOT best.

Images are shown to the network at ``INPUT_SIZE`` px (grey repeated to RGB),
below the 224 px it was trained at: the stimuli are 28-32 px objects, which
upsampling to 128 px already magnifies four times, and 224 px costs 5x the
time on a CPU for features that differ little at this scale.

The feature network must never be the evaluation classifier: a decoder would
then be scored by the very features the simulated cortex carries
(:func:`mindvis.config.validate` refuses that configuration).
"""

from __future__ import annotations

import functools

import numpy as np

from mindvis.errors import MindvisError

#: Side (px) the images are resized to before the network.
INPUT_SIZE = 128
#: Side of the average-pooling grid of the mid layer.
MID_GRID = 2
#: The layers read, in the order their columns are stored.
LAYERS = ("mid", "late")
#: Feature networks the simulator can use (``simulate.feature_network``).
NETWORKS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: Version of the feature recipe (layers, pooling, input size), stored in every cache file.
RECIPE = f"mid=last stride-16 block, {MID_GRID}x{MID_GRID} avg; late=head, global avg; input {INPUT_SIZE} px"


@functools.lru_cache(maxsize=1)
def _load(network_name):
    """The network in eval mode, loaded once per process (it is only ever run under inference mode)."""
    from mindvis.data.imagenet_networks import load_efficientnet_lite

    if network_name not in NETWORKS:
        raise MindvisError(f"unknown feature network '{network_name}'", key="simulate.feature_network",
                           fix=f"use one of {', '.join(NETWORKS)}.")
    return load_efficientnet_lite(network_name, key="simulate.feature_network")


def layer_features(images, network_name="efficientnet_lite0", batch_size=64, threads=None):
    """Mid- and late-layer features of images.

    Parameters
    ----------
    images : uint8 [N, H, W, C] or [N, H, W]
        Any size; resized to ``INPUT_SIZE``.
    network_name : str
        One of ``NETWORKS``.
    batch_size : int
    threads : int, optional
        torch's intra-op threads while extracting (restored after).

    Returns
    -------
    dict
        ``mid`` float32 [N, C_mid * MID_GRID ** 2] and ``late`` float32 [N, C_late].
    """
    import torch
    import torch.nn.functional as F

    from mindvis.data.imagenet_networks import LITE_MEAN, LITE_STD, imagenet_input

    network, _ = _load(network_name)
    images = np.asarray(images)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    mids, lates = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                inputs = imagenet_input(images[start:start + batch_size], INPUT_SIZE, LITE_MEAN, LITE_STD)
                hidden = network._swish(network._bn0(network._conv_stem(inputs)))
                mid = None
                for block in network._blocks:
                    hidden = block(hidden)  # eval mode: no drop-connect
                    if hidden.shape[-1] * 16 == INPUT_SIZE:
                        mid = hidden  # the last block at output stride 16
                head = network._swish(network._bn1(network._conv_head(hidden)))
                mids.append(F.adaptive_avg_pool2d(mid, MID_GRID).flatten(1).numpy())
                lates.append(head.mean(dim=(2, 3)).numpy())
    finally:
        torch.set_num_threads(previous)
    if not mids:
        return {"mid": np.zeros((0, 0), np.float32), "late": np.zeros((0, 0), np.float32)}
    return {"mid": np.concatenate(mids).astype(np.float32), "late": np.concatenate(lates).astype(np.float32)}


def write_stimulus_features(stimuli_path, out_path, network_name="efficientnet_lite0", threads=None):
    """Compute the features of every image of a stimulus file once and write them (the simulator's cache).

    Parameters
    ----------
    stimuli_path : str or Path
        The stimulus HDF5 (:mod:`mindvis.data.stimuli`).
    out_path : str or Path
        HDF5 with ``stimulus_id`` [N], ``mid`` and ``late``, and attributes
        ``network``, ``recipe``, ``stimuli_sha256`` and ``versions``; written atomically.
    network_name : str
    threads : int, optional

    Returns
    -------
    pathlib.Path
    """
    from pathlib import Path

    import h5py

    from mindvis.data.stimuli import load_stimulus_set
    from mindvis.utils.io import atomic_path, hdf5_for_writing, sha256_file, software_versions

    stimuli = load_stimulus_set(stimuli_path, splits=("train", "test"))  # what subjects see
    ids = np.concatenate([split.stimulus_id for split in stimuli.splits.values()])
    images = np.concatenate([split.images for split in stimuli.splits.values()])
    features = layer_features(images, network_name, threads=threads)
    string = h5py.string_dtype("utf-8")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp, hdf5_for_writing(tmp) as handle:
        handle.attrs["network"] = network_name
        handle.attrs["recipe"] = RECIPE
        handle.attrs["stimuli_sha256"] = sha256_file(stimuli_path)
        handle.attrs["versions"] = str(software_versions())
        handle.create_dataset("stimulus_id", data=np.asarray(ids, dtype=object), dtype=string)
        for layer in LAYERS:
            handle.create_dataset(layer, data=features[layer])
    return out_path


def read_stimulus_features(path, stimulus_ids, network_name, stimuli_path=None):
    """The cached features of the given stimuli, checked against what made them.

    Parameters
    ----------
    path : str or Path
        A file of :func:`write_stimulus_features`.
    stimulus_ids : sequence of str [S]
        The stimuli wanted, in this order.
    network_name : str
        The network the config asks for.
    stimuli_path : str or Path, optional
        The stimulus file; when given, its SHA-256 must be the one the features were made from.

    Returns
    -------
    dict
        ``mid`` and ``late``, float32 [S, ...].
    """
    import h5py

    from mindvis.utils.io import sha256_file

    fix = "delete it and rerun (snakemake remakes it with the rule stimulus_features; " \
          "or mindvis stimulus-features --stimuli ... --out ...)."
    try:
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
            stored = [value.decode() if isinstance(value, bytes) else value for value in handle["stimulus_id"][()]]
            features = {layer: handle[layer][()] for layer in LAYERS}
    except (OSError, KeyError) as error:
        raise MindvisError(f"cannot read the stimulus features ({error})", path=path, fix=fix) from error
    if attrs.get("network") != network_name or attrs.get("recipe") != RECIPE:
        raise MindvisError(f"these features are of {attrs.get('network')} ({attrs.get('recipe')}), the config asks "
                           f"for {network_name} ({RECIPE})", path=path, key="simulate.feature_network", fix=fix)
    if stimuli_path is not None and attrs.get("stimuli_sha256") != sha256_file(stimuli_path):
        raise MindvisError(f"these features were computed from another stimulus file than {stimuli_path}",
                           path=path, fix=fix)
    row_of = {sid: row for row, sid in enumerate(stored)}
    missing = [sid for sid in stimulus_ids if sid not in row_of]
    if missing:
        raise MindvisError(f"{len(missing)} stimuli have no features here (first: {missing[0]})", path=path, fix=fix)
    rows = np.array([row_of[sid] for sid in stimulus_ids], dtype=np.int64)
    return {layer: features[layer][rows] for layer in LAYERS}

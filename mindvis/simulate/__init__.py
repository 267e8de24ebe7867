"""The embedded default: simulated subjects who watch the stimuli in a scanner.

A ground-truth encoding model placed in nilearn's MNI152 brain, and a scanner
simulation that writes a BIDS dataset a real pipeline would accept.

Modules
-------
geometry    the acquisition grid, the brain, each subject's visual ROIs (V1-V3, LOC, VOT) and the
            group template (the ROIs at the un-jittered anchors: the shared voxel space)
encoding    voxel tuning: pRFs over a Gabor energy pyramid; higher areas read a deep network's layers
            (or C2 / label and shape tuning); tuning maps part shared across subjects in template space
deepnet     the ImageNet network's mid and late layer features, computed once per stimulus set
insilico    ``ground_truth``: a subject's encoding model rebuilt from the config, shown any images
design      event-related runs (training images once, test images repeated)
timeseries  HRF, AR(1) / physiological / drift noise, head motion, raw intensities
traits      per-subject demographics and scale factors (participants.tsv)
bids        the file layout (documented there) and its writers
run         ``simulate_subject`` and ``simulate_rest_subject``: one subject end to end
validate    read a simulated subject back: lag-average trials

May import: ``data``, ``config``, ``utils``, ``errors`` (not ``preprocess``).
"""

from mindvis.simulate.insilico import GroundTruth, ground_truth

__all__ = ["GroundTruth", "ground_truth"]

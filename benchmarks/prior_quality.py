"""Quality of an image prior and its domain classifier on held-out images (the Fashion-MNIST test file).

Measures, on the ``test`` split of a stimulus file that nothing trained on:

* the VAE: PixCorr of each image with its reconstruction (mode of the posterior);
* the reconstruction ceiling: one sample per image given that image's own
  embedding (:func:`mindvis.generate.decode.sample_like`, the ``generate``
  section's sampler and guidance): the classifier's top-1 against the image's
  label, and PixCorr with the image;
* the prior given the null condition (unconditional samples): the classifier's
  top-1 and PixCorr against the same images, the floor the ceiling is read against;
* the classifier: top-1 on the true images.

Every figure carries a 95 % percentile bootstrap interval over images.

    python benchmarks/prior_quality.py --config configs/prior-fashion-mnist.yaml \\
        --stimuli /tmp/prior/stimuli.h5 --prior /tmp/prior/ldm --classifier /tmp/prior/classifier \\
        --out benchmarks/results/prior.json [--n 10000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from mindvis.config import load_config
from mindvis.data.images import images_to_tensor, tensor_to_images
from mindvis.data.stimuli import load_stimulus_set
from mindvis.evaluate.metrics import bootstrap_ci, pixcorr
from mindvis.generate.decode import sample_conditions, sample_like
from mindvis.models.classifiers.domain import load_classifier
from mindvis.models.ldm import load_generator
from mindvis.utils.io import derive_seed, seed_everything, software_versions


def _summary(values):
    values = np.asarray(values, np.float64)
    low, high = bootstrap_ci(np.mean, [values], seed=0)
    return {"mean": float(values.mean()), "ci95": [float(low), float(high)], "n": int(len(values))}


@torch.no_grad()
def vae_reconstructions(generator, images, batch_size=256):
    out = []
    for start in range(0, len(images), batch_size):
        batch = images_to_tensor(images[start:start + batch_size], generator.image_size, generator.image_channels)
        out.append(tensor_to_images(generator.decode(generator.encode(batch, sample=False)).clamp(-1, 1)))
    return np.concatenate(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--stimuli", required=True)
    parser.add_argument("--prior", required=True)
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=10000, help="test images for the sampled figures (all for the VAE)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    seed_everything(derive_seed(config["seed"], "prior-quality"))
    settings = {**config["generate"], "batch_size": 250}
    test = load_stimulus_set(args.stimuli, splits=("test",)).splits["test"]
    generator = load_generator(args.prior)
    generator.vae.eval()
    generator.unet.eval()
    classifier = load_classifier(args.classifier)
    size = generator.image_size
    started = time.perf_counter()
    results = {"n_test_images": int(len(test)), "stimuli": args.stimuli, "prior": args.prior,
               "classifier": args.classifier, "sampler": {k: settings[k] for k in ("sampler", "steps", "guidance_scale",
                                                                                  "eta")}}

    tick = time.perf_counter()
    reconstructions = vae_reconstructions(generator, test.images)
    results["vae_pixcorr"] = _summary(pixcorr(reconstructions, test.images, size))
    results["vae_s"] = round(time.perf_counter() - tick, 1)

    tick = time.perf_counter()
    predicted = classifier.predict_proba(test.images).argmax(axis=1)
    results["classifier_top1_true_images"] = _summary(predicted == test.label)
    results["classifier_s"] = round(time.perf_counter() - tick, 1)

    rows = np.random.default_rng(0).permutation(len(test))[:args.n] if args.n < len(test) else np.arange(len(test))
    rows = np.sort(rows)
    images, labels = test.images[rows], test.label[rows]
    seeds = np.array([[derive_seed(config["seed"], "ceiling", int(r))] for r in rows], np.int64)
    tick = time.perf_counter()
    ceiling = sample_like(generator, images, seeds, settings)[:, 0]
    results["ceiling_s"] = round(time.perf_counter() - tick, 1)
    results["ceiling_images_per_s"] = round(len(rows) / results["ceiling_s"], 2)
    results["ceiling_classifier_top1"] = _summary(classifier.predict_proba(ceiling).argmax(axis=1) == labels)
    results["ceiling_pixcorr"] = _summary(pixcorr(ceiling, images, size))

    n_null = min(len(rows), 1000)
    conditioner = generator.image_conditioner
    null = sample_conditions(generator, conditioner.null(n_null), conditioner.null, seeds[:n_null], settings)[:, 0]
    results["null_classifier_top1"] = _summary(classifier.predict_proba(null).argmax(axis=1) == labels[:n_null])
    results["null_pixcorr"] = _summary(pixcorr(null, images[:n_null], size))

    results.update({"wall_time_s": round(time.perf_counter() - started, 1), "config": args.config,
                    "machine": {"processor": platform.processor() or platform.machine(),
                                "torch_threads": torch.get_num_threads()},
                    "versions": software_versions()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    from mindvis.generate.writing import save_grid

    grid_rows = np.stack([images[:12], reconstructions[rows[:12]], ceiling[:12], null[:12]])
    save_grid(Path(args.out).with_suffix(".png"), grid_rows)  # rows: true, VAE, ceiling, null
    for key in ("vae_pixcorr", "classifier_top1_true_images", "ceiling_classifier_top1", "ceiling_pixcorr",
                "null_classifier_top1", "null_pixcorr"):
        print(f"{key}: {results[key]['mean']:.3f} [{results[key]['ci95'][0]:.3f}, {results[key]['ci95'][1]:.3f}]"
              f" (n={results[key]['n']})")


if __name__ == "__main__":
    main()

"""Random binary contrast patterns: the image corpus of a Miyawaki-style experiment.

Miyawaki et al. (Neuron 2008) trained their decoder on random 10 x 10 patterns
of flickering checkerboard (white) and grey (black) patches and tested it on
geometric shapes and letters drawn on the same grid. A lab that ran that
design has its random patterns; the preprocessed release used by
``configs/miyawaki.yaml`` holds only the shapes and letters, so this writes
the corpus the design describes: ``--n`` patterns, each patch on with
probability 1/2, drawn on the grid at ``--size`` px with nearest-neighbour
resampling (the release's "sharp" 28 px images), as ``images`` uint8
[N, size, size] in an .npz. No image of the experiment is read.

    python benchmarks/contrast_patterns.py --out data/miyawaki/random_patterns.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def contrast_patterns(n, grid=10, size=28, seed=0):
    """``n`` random ``grid`` x ``grid`` binary patterns at ``size`` px: uint8 [n, size, size] in {0, 255}."""
    rng = np.random.default_rng(seed)
    cells = (rng.random((n, grid, grid)) < 0.5).astype(np.uint8) * 255
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.NEAREST)) for c in cells])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--grid", type=int, default=10)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=contrast_patterns(args.n, args.grid, args.size, args.seed))
    print(f"wrote {args.out}: {args.n} patterns of {args.grid} x {args.grid} at {args.size} px")


if __name__ == "__main__":
    main()

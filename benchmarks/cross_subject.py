"""How much two simulated subjects share at the same template voxel: what a subject adapter can inherit.

For every pair of subjects of a finished run (all read at the group template's voxels), the Pearson
correlation across the ``test_avg`` stimuli between subject A's and subject B's response at the same
voxel, and a logistic classifier fitted on A's training trials scored on B's seen-class test stimuli
(against A's own). Near-zero correlations and chance-level transfer mean that a new subject's adapter
cannot start from another subject's: it must be learned from the new subject's own trials.

The summary puts the mean between-subject (A->B) and within-subject (B->B) accuracies beside Haxby et al.
2011 (Neuron 72:404, Fig. 2A), who found that after anatomical alignment between-subject classification in
ventral temporal cortex keeps 0.40-0.62 of within-subject accuracy above chance; here on the whole visual
template (early and higher areas) and on the preprocessed GLM estimates of the finished run.

    python benchmarks/cross_subject.py --results results [--out benchmarks/results/cross_subject]
"""

import argparse
import itertools
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from mindvis.data.responses import load_responses

ROOT = Path(__file__).resolve().parents[1]


def zscore(x):
    return (x - x.mean(0)) / (x.std(0) + 1e-9)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cross_subject"))
    args = parser.parse_args()
    folders = sorted(p.parent for p in Path(args.results).glob("sub-*/responses.h5"))
    data = {f.name: load_responses(f / "responses.h5", splits=("train", "test_avg")) for f in folders}
    lines = ["# Cross-subject correspondence at the same template voxel\n",
             f"Run: `python benchmarks/cross_subject.py --results {args.results}`.\n",
             "| A | B | voxels | per-voxel r across test stimuli: median | mean | 90th pct | logistic A->B (seen) | "
             "logistic B->B (seen) | chance |", "|---|---|---|---|---|---|---|---|---|"]
    between, within, correlations = [], [], []
    for a, b in itertools.permutations(data, 2):
        ta, tb = data[a]["test_avg"], data[b]["test_avg"]
        oa, ob = np.argsort(ta.stimulus_id), np.argsort(tb.stimulus_id)
        r = (zscore(ta.fmri[oa]) * zscore(tb.fmri[ob])).mean(0)
        seen = np.isin(tb.label, np.unique(data[a]["train"].label))
        scores = []
        for source in (a, b):
            train = data[source]["train"]
            clf = LogisticRegression(C=0.01, max_iter=2000).fit(zscore(train.fmri), train.label)
            scores.append(float((clf.predict(zscore(tb.fmri))[seen] == tb.label[seen]).mean()))
        chance = 1 / len(np.unique(data[a]["train"].label))
        between.append(scores[0])
        within.append(scores[1])
        correlations.append(np.median(r))
        lines.append(f"| {a} | {b} | {len(r)} | {np.median(r):.3f} | {r.mean():.3f} | {np.percentile(r, 90):.3f} | "
                     f"{scores[0]:.3f} | {scores[1]:.3f} | {chance:.3f} |")
    if between:
        ratio = (np.mean(between) - chance) / (np.mean(within) - chance)
        lines += ["", f"Mean over ordered pairs: per-voxel r median {np.mean(correlations):.3f}; between-subject "
                      f"(A->B) {np.mean(between):.3f}, within-subject (B->B) {np.mean(within):.3f}, chance "
                      f"{chance:.3f}; (between - chance) / (within - chance) = {ratio:.2f}. Haxby et al. 2011 "
                      "(anatomical alignment, ventral temporal cortex): 0.62 faces and objects, 0.40 animal species."]
    out = Path(args.out).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()

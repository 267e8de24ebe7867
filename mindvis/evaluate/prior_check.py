"""Whether the image prior can draw the lab's images at all (:func:`check_prior`).

Every decoder of the workflow draws through the prior (the base generator), so
a prior trained on another domain than the stimuli caps every decoding: given
each true test image's own embedding (the ``base-ceiling`` row, "prior given
the true image"), it should redraw that image. When it cannot, the decoders'
low scores say nothing about the fMRI, and the fix is a prior of the lab's
domain, not another decoder.

The check reads no labels and no classifier, only pixels. The ceiling passes
when the lower bound of its PixCorr interval (the evaluation's bootstrap over
test stimuli, ``evaluate.ci_level``) lies above the point value of the
``mean-train-image`` floor's PixCorr (the mean training image as the decoding
of every test stimulus): a prior of the stimulus domain, given the true image,
draws it better than the one image that knows nothing about the stimulus. When
it does not, the run warns on the command line, in ``metrics.json``
(``prior``: ``usable``, ``reason``, ``check``), in the subject's report and in
the summary. Nothing is withheld: the figures stand, with the warning beside
them. Where either row is unavailable (a Stable Diffusion base has no
base-ceiling row without an image encoder; no training images), the check is
not made (``usable`` null).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: The row whose reconstruction is checked, and the floor it must clear.
CEILING_ROW, FLOOR_ROW = "base-ceiling", "mean-train-image"
#: The pixel metric compared (reads neither labels nor the classifier).
METRIC = "pixcorr"
#: What to do about a prior of another domain.
FIX = ("train a prior on images of the lab's domain: set ldm.base: embedded and ldm.corpus to a folder of such "
       "images (the stimuli or a larger set of their kind), or train one with `make prior` "
       "(PRIOR_CONFIG naming that corpus) and point ldm.base at it")


@dataclass
class PriorCheck:
    """The outcome of :func:`check_prior`.

    Attributes
    ----------
    usable : bool or None
        None where the check could not be made (either row unavailable).
    reason : str or None
        Why the prior cannot draw the lab's images, with the fix (None when usable or unchecked).
    record : dict
        For ``metrics.json``: ``metric``, ``ceiling_row``, ``ceiling_value``, ``ceiling_ci``, ``floor_row``,
        ``floor_value`` and ``not_checked`` (why, where the check could not be made).
    """

    usable: bool | None
    reason: str | None
    record: dict = field(default_factory=dict)


def _pixcorr(rows, row_id):
    """A row's PixCorr entry (``value``, ``ci``), or None where the row or the figure is unavailable."""
    row = next((row for row in rows if row["id"] == row_id), None)
    if row is None or not row.get("available"):
        return None
    entry = (row.get("metrics") or {}).get(METRIC)
    return entry if entry and entry.get("value") is not None else None


def check_prior(rows):
    """Whether the prior, given the true images' embeddings, draws them clearly better than the mean-image floor.

    Parameters
    ----------
    rows : list of dict
        The evaluation's rows in the ``metrics.json`` layout (:meth:`mindvis.evaluate.table.Table.ordered`).

    Returns
    -------
    PriorCheck
        Not usable when the lower bound of the base-ceiling row's PixCorr interval is not above the
        mean-train-image floor's PixCorr (see the module docstring).
    """
    ceiling, floor = _pixcorr(rows, CEILING_ROW), _pixcorr(rows, FLOOR_ROW)
    record = {"metric": METRIC, "ceiling_row": CEILING_ROW, "floor_row": FLOOR_ROW,
              "ceiling_value": None if ceiling is None else ceiling["value"],
              "ceiling_ci": None if ceiling is None else ceiling.get("ci"),
              "floor_value": None if floor is None else floor["value"]}
    if ceiling is None or floor is None or not ceiling.get("ci"):
        missing = CEILING_ROW if ceiling is None or not ceiling.get("ci") else FLOOR_ROW
        record["not_checked"] = f"no {METRIC} interval of row {missing}"
        return PriorCheck(None, None, record)
    low = float(ceiling["ci"][0])
    if low > float(floor["value"]):
        return PriorCheck(True, None, record)
    reason = (f"the prior cannot draw these images: given each true test image's own embedding, its PixCorr is "
              f"{ceiling['value']:.3f} (interval from {low:.3f}), not above the mean training image's "
              f"{floor['value']:.3f}; a prior of another domain caps every decoder that draws through it. To fix: "
              f"{FIX}")
    log.warning("%s.", reason)
    return PriorCheck(False, reason, record)

"""One decoder for several subjects: shared parts, and a small input adapter per subject.

MindEye2's recipe (Scotti et al., ICML 2024) on the DC-LDM: every subject's
fMRI enters through its own linear layer into a space all subjects share, and
everything after it is one model trained on every subject's trials. Here the
shared space is the voxel path's rank-K space: each subject's adapter is the
``voxel_down`` of its :class:`~mindvis.models.conditioning.FmriConditioner`
(its voxels -> K values, no bias), and the up-projection ``voxel_map``
(K -> the condition or the prior's embedding), the mapper from encoder tokens,
the null condition, the SC-MBM encoder and the UNet's trained layers are one
set of modules, tied into every subject's decoder.

A subject's decoder is therefore an ordinary :class:`~mindvis.models.dcldm.DCLDM`
(a *view*), and each view is saved as an ordinary decoder folder
(:func:`~mindvis.models.dcldm.save_dcldm`): sampling, evaluation and reports
read a shared-model subject exactly as a per-subject one. The price is that the
shared weights are stored once per subject.

The rank-K space starts from a reduced-rank ridge (:func:`shared_ridge_start`):
the K directions of the condition space that the subjects' own ridge maps
predict best, together, K chosen on the subjects' validation trials
(:func:`rank_errors`) up to ``finetune.shared_rank``. A new subject (few-shot)
gets an adapter fitted onto the first r <= K of those directions from its few
trials, r and the ridge alpha chosen together on its validation trials
(:func:`fit_adapter`): the fewer its trials, the fewer directions it can
estimate, and the other subjects have said which directions come first. The
shared parts then decide what its values mean.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import Ridge

from mindvis.errors import MindvisError
from mindvis.models.conditioning import FmriConditioner
from mindvis.models.dcldm import DCLDM, drop_condition

#: The conditioner's modules every subject shares (all but ``voxel_down``, the subject's adapter).
SHARED_CONDITIONER_MODULES = ("norm", "width_map", "token_map", "token_dropout", "pooled_proj", "output_norm",
                              "voxel_map")
SHARED_CONDITIONER_PARAMETERS = ("null_context", "null_pooled")


def subject_view(core, n_voxels):
    """A decoder for another subject that shares every part of ``core`` but the input adapter.

    Parameters
    ----------
    core : DCLDM
        A decoder whose conditioner has a rank-K voxel path (``voxel_down`` set).
    n_voxels : int
        The other subject's voxel count (may differ from ``core``'s).

    Returns
    -------
    DCLDM
        Its conditioner's ``voxel_down`` (``n_voxels`` -> K) is new and random; every other module
        (encoder, mapper, ``voxel_map``, null condition, UNet, prior) is ``core``'s own object.
    """
    shared = core.conditioner
    if shared.voxel_down is None:
        raise MindvisError("a shared decoder needs a rank-K voxel path (the subjects' adapters map into it)",
                           key="finetune.shared_rank", fix="set finetune.shared_rank to a rank below the voxel count.")
    rank = shared.voxel_down.out_features
    if rank >= n_voxels:
        raise MindvisError(f"finetune.shared_rank {rank} is not below a subject's voxel count ({n_voxels})",
                           key="finetune.shared_rank", fix=f"set it below {n_voxels}.")
    settings = dict(shared.config)
    settings = {key: settings[key] for key in ("input_tokens", "input_dim", "context_tokens", "cross_attention_dim",
                                               "pooled_dim", "dropout", "embedding")}
    conditioner = FmriConditioner(**settings, n_voxels=int(n_voxels), voxel_rank=rank)
    for name in SHARED_CONDITIONER_MODULES:
        setattr(conditioner, name, getattr(shared, name))
    for name in SHARED_CONDITIONER_PARAMETERS:
        setattr(conditioner, name, getattr(shared, name))
    conditioner.to(device=shared.voxel_down.weight.device, dtype=shared.voxel_down.weight.dtype)
    return DCLDM(core.encoder, conditioner, core.unet, prior=core.prior)


class SharedDecoder(torch.nn.Module):
    """Several subjects' decoders with every part tied but the input adapters.

    Parameters
    ----------
    views : dict of str -> DCLDM
        Subject -> its decoder, built with :func:`subject_view` from one core (or loaded and re-tied by
        :meth:`from_views`). ``named_parameters`` lists each shared tensor once.

    Attributes
    ----------
    subjects : list of str
        In the order given; a batch's ``subject`` values index this list.
    """

    def __init__(self, views):
        super().__init__()
        self.subjects = list(views)
        self.views = torch.nn.ModuleDict(views)

    # The shared parts, through the first view (properties, so that each tensor has one name: views.<first>.*).
    @property
    def encoder(self):
        return self.views[self.subjects[0]].encoder

    @property
    def unet(self):
        return self.views[self.subjects[0]].unet

    @property
    def prior(self):
        return self.views[self.subjects[0]].prior

    @classmethod
    def from_core(cls, core, n_voxels):
        """Views for every subject of ``n_voxels`` (subject -> voxel count) around ``core``'s shared parts."""
        return cls({subject: subject_view(core, count) for subject, count in n_voxels.items()})

    @classmethod
    def from_views(cls, views):
        """Re-tie decoders loaded one by one (:func:`~mindvis.models.dcldm.load_dcldm` of each subject's folder).

        The first view's shared modules are kept; each other view keeps only its adapter, and its shared
        tensors must equal the first's (they were saved from one shared model).
        """
        views = dict(views)
        subjects = list(views)
        core = views[subjects[0]]
        tied = {subjects[0]: core}
        reference = {name: tensor for name, tensor in core.state_dict().items() if ".voxel_down." not in name}
        for subject in subjects[1:]:
            view = views[subject]
            for name, tensor in view.state_dict().items():
                if ".voxel_down." in name or name not in reference:
                    continue
                if not torch.equal(tensor, reference[name]):
                    raise MindvisError(f"the decoders of {subjects[0]} and {subject} differ in the shared tensor "
                                       f"'{name}': they are not views of one shared model",
                                       key=name, fix="load the folders one finetune_shared run wrote.")
            fresh = subject_view(core, view.conditioner.config.n_voxels)
            fresh.conditioner.voxel_down.load_state_dict(view.conditioner.voxel_down.state_dict())
            tied[subject] = fresh
        return cls(tied)

    def add_subject(self, subject, n_voxels):
        """A new subject's view (a random adapter) tied to the shared parts; returned and kept."""
        if subject in self.views:
            raise ValueError(f"{subject} is already in the shared decoder")
        view = subject_view(self.views[self.subjects[0]], n_voxels)
        self.views[subject] = view
        self.subjects.append(subject)
        return view

    def view(self, subject):
        return self.views[subject]

    def null(self, batch_size):
        return self.views[self.subjects[0]].null(batch_size)

    def condition(self, fmri, subject):
        """The UNet condition of a batch mixing subjects (fmri zero-padded to the widest subject)."""
        return self._route(fmri, subject, lambda view, rows: view.condition(rows))

    def embedding(self, fmri, subject):
        return self._route(fmri, subject, lambda view, rows: view.embedding(rows))

    def _route(self, fmri, subject, call):
        subject = torch.as_tensor(subject, device=fmri.device)
        pieces, order = [], []
        present = torch.unique(subject).tolist()
        for index in present:
            rows = torch.nonzero(subject == index).flatten()
            view = self.views[self.subjects[index]]
            pieces.append(call(view, fmri[rows, :view.conditioner.config.n_voxels]))
            order.append(rows)
        inverse = torch.argsort(torch.cat(order))
        # A trained adapter of a subject absent from this batch still joins the graph (times zero): multi-process
        # training (DDP) expects a gradient for every trained parameter on every step.
        idle = [view.conditioner.voxel_down.weight for index, view in enumerate(self.views.values())
                if index not in present and view.conditioner.voxel_down.weight.requires_grad]
        zero = sum(weight.sum() for weight in idle) * 0.0 if idle and torch.is_grad_enabled() else None
        if isinstance(pieces[0], torch.Tensor):
            out = torch.cat(pieces)[inverse]
            return out if zero is None else out + zero.to(out.dtype)
        out = type(pieces[0]).cat(pieces).select(inverse)
        return out if zero is None else type(out)(out.context + zero.to(out.context.dtype), out.pooled)

    def forward(self, noisy_latents, timesteps, fmri, subject, drop=None, return_condition=False):
        """As :meth:`DCLDM.forward`, for a batch mixing subjects: ``subject`` [B] indexes :attr:`subjects`."""
        noisy_latents = noisy_latents.contiguous()
        output = self.embedding(fmri, subject)
        prior = self.prior
        condition = used = prior.condition(output) if prior is not None else output
        if drop is not None:
            used = drop_condition(condition, self.null(len(condition)), drop)
        prediction = self.unet(noisy_latents, timesteps, encoder_hidden_states=used.context,
                               class_labels=used.pooled).sample
        return (prediction, output) if return_condition else prediction


def shared_ridge_start(weights, biases, fmri, rank):
    """The shared rank-K voxel path from each subject's own ridge map (reduced-rank regression, pooled).

    The K directions of the output space are the top principal axes of the subjects' ridge
    predictions on their own training trials, stacked (centred per subject): the part of the
    condition the subjects' brains predict, in the directions they predict together. Each subject's
    adapter is its ridge map seen through them.

    Parameters
    ----------
    weights : list of float [E, V_s]
        Each subject's ridge map (voxels -> the E flattened condition values).
    biases : list of float [E]
    fmri : list of float [N_s, V_s]
        Each subject's training fMRI (what the predictions are made on).
    rank : int

    Returns
    -------
    up : float32 [E, K]
        The shared ``voxel_map`` weight (orthonormal columns times the pooled singular values' square roots).
    bias : float32 [E]
        The shared ``voxel_map`` bias: the mean of the subjects' ridge intercepts.
    adapters : list of float32 [K, V_s]
        Each subject's ``voxel_down``: ``up^+ W_s`` (its ridge map seen through the shared directions).
    info : dict
        Share of the pooled prediction variance the K directions hold.
    """
    predictions = [np.asarray(x, np.float64) @ np.asarray(w, np.float64).T for w, x in zip(weights, fmri)]
    stacked = np.concatenate([p - p.mean(axis=0) for p in predictions])
    _, singular, right = np.linalg.svd(stacked, full_matrices=False)
    rank = int(min(rank, len(singular)))
    basis = right[:rank].T  # [E, K], orthonormal columns
    scale = np.sqrt(singular[:rank] / np.sqrt(len(stacked)))
    up = basis * scale[None]
    pseudo = basis.T / scale[:, None]  # up^+ for orthonormal basis columns
    adapters = [(pseudo @ np.asarray(w, np.float64)).astype(np.float32) for w in weights]
    variance = singular ** 2
    cumulative = np.cumsum(variance) / max(variance.sum(), 1e-12)
    info = {"rank": rank, "variance_kept": float(cumulative[rank - 1]),
            "variance_per_rank": [float(v) for v in cumulative[:rank]], "n_trials": int(len(stacked))}
    return up.astype(np.float32), np.mean(biases, axis=0).astype(np.float32), adapters, info


def adapter_from_ridge(up, weight):
    """A subject's adapter ``up^+ W`` (its ridge map ``W`` [E, V] seen through the shared directions)."""
    up = np.asarray(up, np.float64)
    return (np.linalg.pinv(up) @ np.asarray(weight, np.float64)).astype(np.float32)


def rank_candidates(rank):
    """The ranks tried up to ``rank``: 1, 2, 4, ... below it, and ``rank`` itself."""
    rank = int(rank)
    candidates = [2 ** k for k in range(rank.bit_length()) if 2 ** k < rank]
    return candidates + [rank]


def rank_errors(up, bias, weights, fmri, targets, ranks):
    """Relative squared error of the rank-r voxel path on held-out trials, pooled over subjects, per rank.

    The decoder's own prediction at rank r: ``up_r (up_r^+ W_s x) + bias``, i.e. each subject's
    ridge map seen through the first r shared directions (``up``'s columns in order of the pooled
    singular values), plus the shared intercept. Pooled as sum of squared errors over the sum of
    each subject's squared deviations from its own target mean.

    Parameters
    ----------
    up : float [E, K]
    bias : float [E]
    weights : list of float [E, V_s]
    fmri, targets : list of float [N_s, V_s], float [N_s, E]
        Each subject's validation trials and their targets.
    ranks : list of int, each <= K

    Returns
    -------
    dict of int -> float
    """
    up = np.asarray(up, np.float64)
    bias = np.asarray(bias, np.float64)
    predictions = [np.asarray(x, np.float64) @ np.asarray(w, np.float64).T for w, x in zip(weights, fmri)]
    targets = [np.asarray(y, np.float64) for y in targets]
    total = sum(float(((y - y.mean(axis=0)) ** 2).sum()) for y in targets)
    errors = {}
    for rank in ranks:
        through = up[:, :rank] @ np.linalg.pinv(up[:, :rank])  # onto the first r directions (any up, trained too)
        squared = sum(float(((p @ through.T + bias - y) ** 2).sum()) for p, y in zip(predictions, targets))
        errors[int(rank)] = squared / max(total, 1e-12)
    return errors


def select_rank(errors, tolerance=1e-9):
    """The smallest rank whose validation error is the lowest (within a relative ``tolerance``: a tie)."""
    lowest = min(errors.values())
    return min(rank for rank, error in errors.items() if error <= lowest + tolerance * abs(lowest))


def fit_adapter(up, bias, train_x, train_y, val_x, val_y, alphas):
    """A new subject's adapter onto the shared directions, its rank and ridge alpha chosen together on val.

    For each alpha, the subject's ridge map ``W`` (fitted on the training trials only); for each
    rank r of :func:`rank_candidates` (K), the decoder's prediction through the first r shared
    directions (:func:`rank_errors`); the pair with the lowest relative squared error on the val
    trials wins. The adapter is ``up_r^+ W`` in its first r rows and zero below (those directions
    stay closed: :func:`mask_adapter_rows`).

    Returns
    -------
    adapter : float32 [K, V]
    rank : int
    report : dict
        ``alpha``, ``rank``, ``val_relative_error`` (rank -> its best alpha's error), ``n_train``, ``n_val``.
    """
    up = np.asarray(up, np.float64)
    width = up.shape[1]
    ranks = rank_candidates(width)
    train_x, train_y = np.asarray(train_x, np.float64), np.asarray(train_y, np.float64)
    best, per_rank = None, {}
    for alpha in alphas:
        model = Ridge(alpha=float(alpha)).fit(train_x, train_y)  # on train only: val judges the pair
        errors = rank_errors(up, bias, [model.coef_], [val_x], [val_y], ranks)
        for rank, error in errors.items():
            if rank not in per_rank or error < per_rank[rank][0]:
                per_rank[rank] = (error, float(alpha))
            if best is None or (error, rank) < (best[0], best[1]):
                best = (error, rank, float(alpha), model.coef_)
    _, rank, alpha, weight = best
    adapter = np.zeros((width, train_x.shape[1]), np.float32)
    adapter[:rank] = adapter_from_ridge(up[:, :rank], weight)
    report = {"alpha": alpha, "rank": int(rank), "ranks": ranks,
              "val_relative_error": {str(r): e for r, (e, _) in per_rank.items()},
              "alpha_per_rank": {str(r): a for r, (_, a) in per_rank.items()},
              "n_train": int(len(train_x)), "n_val": int(len(val_x))}
    return adapter.astype(np.float32), int(rank), report


def mask_adapter_rows(parameter, rank):
    """Keep rows ``rank:`` of an adapter weight at zero through training (their gradient is zeroed)."""
    if rank >= parameter.shape[0]:
        return None
    mask = torch.zeros_like(parameter)
    mask[:rank] = 1
    return parameter.register_hook(lambda grad: grad * mask)

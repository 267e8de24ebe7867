"""A prior in embedding space: a decoded embedding moved onto the manifold of real images' embeddings.

A brain -> embedding regression shrinks towards the mean: its predictions lie
between the images the prior was trained on, and the prior draws a generic
object from them. MindEye (Scotti et al., NeurIPS 2023) and unCLIP put a
diffusion prior between the brain's embedding and the generator for this; the
cheaper form here is a soft nearest-neighbour projection onto a bank of real
image embeddings (the prior's own corpus, embedded by its frozen image
encoder), as retrieval-augmented decoders do:

    neighbours = the ``k`` bank embeddings of highest cosine similarity with the decoded one (both centred
                 on the bank's mean)
    projected  = sum_i softmax(similarity_i / temperature) * bank_i
    output     = each token of (1 - weight) * decoded + weight * projected standardised, as the prior's are

``k``, ``temperature`` and ``weight`` are chosen on the validation split
without labels (:func:`mindvis.train.embedding_prior.fit_embedding_prior`).

A decoder folder holds it as ``embedding_prior.safetensors`` (``bank`` float32
[N, tokens, token_dim]) and ``embedding_prior.json`` (``k``, ``temperature``,
``weight``, where the bank came from and how the settings were chosen).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mindvis.errors import MindvisError
from mindvis.utils.io import atomic_path, write_json_atomic

EMBEDDING_PRIOR_FILE = "embedding_prior.safetensors"
EMBEDDING_PRIOR_META = "embedding_prior.json"


def standardise_tokens(embedding):
    """Each token ``[..., token_dim]`` to zero mean and unit variance: the prior's own LayerNorm without weights."""
    return torch.nn.functional.layer_norm(embedding, embedding.shape[-1:])


def centred_unit(embeddings, centre):
    """Embeddings ``[N, tokens, token_dim]`` flattened, less ``centre`` [tokens * token_dim], to unit length."""
    return torch.nn.functional.normalize(embeddings.flatten(1).float() - centre.to(embeddings.device), dim=1)


@dataclass
class EmbeddingPrior:
    """Soft k-nearest-neighbour projection onto a bank of real image embeddings (module docstring).

    Attributes
    ----------
    bank : float32 [N, tokens, token_dim]
        The prior's embeddings of the bank images.
    k : int
        Neighbours averaged (clipped to the bank's size).
    temperature : float
        Softmax temperature over the neighbours' cosine similarities.
    weight : float
        In (0, 1]: the share of the projection in the output (1: the projection alone).
    info : dict
        Where the bank came from and how the settings were chosen.
    """

    bank: torch.Tensor
    k: int
    temperature: float
    weight: float
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.bank.ndim != 3 or not len(self.bank):
            raise ValueError("the bank must be a non-empty [N, tokens, token_dim] tensor, "
                             f"got {tuple(self.bank.shape)}")
        if self.k < 1 or self.temperature <= 0 or not 0 < self.weight <= 1:
            raise ValueError(f"need k >= 1, temperature > 0 and 0 < weight <= 1 (got k={self.k}, "
                             f"temperature={self.temperature}, weight={self.weight})")
        self.centre = self.bank.flatten(1).float().mean(0)
        self._unit = centred_unit(self.bank, self.centre)

    def neighbours(self, embedding):
        """Indices ``[B, k]`` of each row's nearest bank embeddings and their cosine similarities ``[B, k]``."""
        similarity = centred_unit(embedding, self.centre) @ self._unit.to(embedding.device).T
        values, index = similarity.topk(min(self.k, len(self.bank)), dim=1)
        return index, values

    def __call__(self, embedding):
        """Decoded embeddings ``[B, tokens, token_dim]`` -> the same moved towards the bank (module docstring)."""
        index, values = self.neighbours(embedding)
        weights = torch.softmax(values / self.temperature, dim=1)
        bank = self.bank.to(embedding.device, torch.float32)
        projected = (weights[..., None, None] * bank[index]).sum(1)
        mixed = (1 - self.weight) * embedding.float() + self.weight * projected
        return standardise_tokens(mixed).to(embedding.dtype)

    def settings(self):
        return {"k": int(self.k), "temperature": float(self.temperature), "weight": float(self.weight)}


def save_embedding_prior(folder, prior):
    """Write ``embedding_prior.safetensors`` and ``embedding_prior.json`` into a decoder folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / EMBEDDING_PRIOR_FILE) as tmp:
        save_file({"bank": prior.bank.contiguous().float()}, str(tmp))
    write_json_atomic(folder / EMBEDDING_PRIOR_META, {**prior.settings(), **prior.info})


def load_embedding_prior(folder):
    """The decoder folder's :class:`EmbeddingPrior`, or None when it has none."""
    folder = Path(folder)
    if not (folder / EMBEDDING_PRIOR_FILE).exists():
        return None
    if not (folder / EMBEDDING_PRIOR_META).exists():
        raise MindvisError(f"{EMBEDDING_PRIOR_FILE} without {EMBEDDING_PRIOR_META}", path=folder,
                           key=EMBEDDING_PRIOR_META, fix="rerun finetune for this subject; the folder is incomplete.")
    info = json.loads((folder / EMBEDDING_PRIOR_META).read_text())
    bank = load_file(str(folder / EMBEDDING_PRIOR_FILE))["bank"]
    return EmbeddingPrior(bank, int(info.pop("k")), float(info.pop("temperature")), float(info.pop("weight")), info)

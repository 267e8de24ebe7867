"""Import MinD-Vis's released SC-MBM checkpoint (``fmri_encoder.pth``) as a mindvis SC-MBM model.

MinD-Vis saves ``{"model": state_dict, "config": <its config object>, ...}``
with ``torch.save``. The state dict uses timm ViT block names:

==========================================  ===========================================  =====================
MinD-Vis key                                mindvis key (:class:`MBMAutoencoder`)         shape (paper size)
==========================================  ===========================================  =====================
``patch_embed.proj.weight`` / ``.bias``     ``patch_embed.weight`` / ``.bias``            [1024, 1, 16] / [1024]
``cls_token``                               ``cls_token``                                 [1, 1, 1024]
``pos_embed``                               ``pos_embed``                                 [1, 1 + L, 1024]
``blocks.i.norm1`` / ``norm2``              same                                          [1024]
``blocks.i.attn.qkv`` / ``attn.proj``       same                                          [3072, 1024] / ...
``blocks.i.mlp.fc1`` / ``mlp.fc2``          ``blocks.i.mlp.0`` / ``blocks.i.mlp.2``       [1024 * r, 1024] ...
``norm``                                    ``norm``                                      [1024]
``decoder_embed``, ``decoder_pos_embed``,   same names (``decoder_blocks.i.mlp.fc1`` ->   decoder 512 x 8
``mask_token``, ``decoder_blocks.i.*``,     ``decoder_blocks.i.mlp.0``)
``decoder_norm``, ``decoder_pred``
==========================================  ===========================================  =====================

The voxel count is ``L * patch_size`` (MinD-Vis pads voxels to whole
patches). Head counts are not in a state dict: they come from the pickled
config when it records them, else from the command line, else MinD-Vis's 16.
Anything else (``nature_img_*`` decoders, an encoder-only ``mask_token``,
LayerScale or q/k-norm weights of newer timm blocks) is listed as not mapped;
mindvis tensors the checkpoint lacks (e.g. the decoder of an encoder-only
file) keep their fresh initialisation and are listed too. ``strict`` makes
either list an error.

The file is read with ``torch.load(weights_only=True)``. Its pickled config
object is of a class mindvis does not have: each such class is replaced by an
inert stand-in that only stores the pickled attributes, so no code from the
file is ever run.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from pathlib import Path

import numpy as np

from mindvis.errors import MindvisError
from mindvis.utils.io import sha256_file, software_versions, write_json_atomic

log = logging.getLogger(__name__)

MINDVIS_DEFAULT_HEADS = 16
_BLOCK_PART = re.compile(r"^(?P<prefix>(decoder_)?blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.0.weight", "mlp.fc1.bias": "mlp.0.bias",
    "mlp.fc2.weight": "mlp.2.weight", "mlp.fc2.bias": "mlp.2.bias",
}
_PLAIN_RENAMES = {
    "patch_embed.proj.weight": "patch_embed.weight", "patch_embed.proj.bias": "patch_embed.bias",
    "cls_token": "cls_token", "pos_embed": "pos_embed", "norm.weight": "norm.weight", "norm.bias": "norm.bias",
    "decoder_embed.weight": "decoder_embed.weight", "decoder_embed.bias": "decoder_embed.bias",
    "decoder_pos_embed": "decoder_pos_embed", "decoder_norm.weight": "decoder_norm.weight",
    "decoder_norm.bias": "decoder_norm.bias", "decoder_pred.weight": "decoder_pred.weight",
    "decoder_pred.bias": "decoder_pred.bias",
}


class _PickledObject:
    """Inert stand-in for a class pickled in a checkpoint: keeps the attributes, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.pickled_args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.pickled_state = state


def load_pickled_checkpoint(path, max_stand_ins=32):
    """``torch.load(path, weights_only=True)``, with inert stand-ins for unknown pickled classes.

    Returns
    -------
    checkpoint : object
        What the file holds (for MinD-Vis: a dict with ``model``).
    stand_ins : list of str
        Qualified names of the classes that were replaced.
    """
    import torch

    stand_ins = []
    for _ in range(max_stand_ins):
        try:
            with torch.serialization.safe_globals(stand_ins):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            return checkpoint, [f"{s.__module__}.{s.__qualname__}" for s in stand_ins]
        except pickle.UnpicklingError as err:
            match = re.search(r"GLOBAL ([\w\.]+) was not an allowed global", str(err))
            if not match:
                raise MindvisError(f"cannot be read with weights_only=True ({str(err).splitlines()[-1][:200]})",
                                   path=path, fix="re-save the state dict alone with torch.save(sd) or safetensors.") \
                    from None
            module, _, name = match.group(1).rpartition(".")
            stand_ins.append(type(name, (_PickledObject,), {"__module__": module, "__qualname__": name}))
        except (RuntimeError, EOFError, OSError) as err:
            raise MindvisError(f"not a readable PyTorch checkpoint ({' '.join(str(err).split())[:300]})", path=path,
                               fix="give the fmri_encoder.pth (or checkpoint.pth) file MinD-Vis wrote.") from None
    raise MindvisError(f"more than {max_stand_ins} unknown pickled classes", path=path,
                       fix="re-save the state dict alone with torch.save(sd).")


def map_key(key):
    """The mindvis name of a MinD-Vis state-dict key, or None when it has no counterpart."""
    key = key[len("module."):] if key.startswith("module.") else key
    if key in _PLAIN_RENAMES:
        return _PLAIN_RENAMES[key]
    match = _BLOCK_PART.match(key)
    if match and match.group("rest") in _BLOCK_RENAMES:
        return f"{match.group('prefix')}.{match.group('index')}.{_BLOCK_RENAMES[match.group('rest')]}"
    return None


def _depth(state, prefix):
    indices = {int(m.group("index")) for k in state if (m := _BLOCK_PART.match(k)) and m.group("prefix") == prefix}
    return max(indices) + 1 if indices else 0


def _need(state, key, path):
    if key not in state:
        raise MindvisError("tensor missing from the state dict", path=path, key=key,
                           fix="give an SC-MBM checkpoint of MinD-Vis (fmri_encoder.pth or checkpoint.pth).")
    return state[key]


def infer_architecture(state, pickled_config=None, num_heads=None, decoder_num_heads=None, path=None):
    """MBMAutoencoder arguments that fit a MinD-Vis state dict.

    Parameters
    ----------
    state : dict of str -> Tensor
        With any ``module.`` prefix already removed.
    pickled_config : object, optional
        The checkpoint's config object (its ``num_heads`` / ``decoder_num_heads`` are used).
    num_heads, decoder_num_heads : int, optional
        Override the head counts.

    Returns
    -------
    dict
        ``n_voxels``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
        ``decoder_embed_dim``, ``decoder_depth``, ``decoder_num_heads``, ``mlp_ratio``.
    notes : list of str
    """
    notes = []
    patch_weight = _need(state, "patch_embed.proj.weight", path)
    if patch_weight.ndim != 3 or patch_weight.shape[1] != 1:
        raise MindvisError(f"patch_embed.proj.weight has shape {tuple(patch_weight.shape)}; a Conv1d over one "
                           "input channel [embed, 1, patch] is expected", path=path, key="patch_embed.proj.weight",
                           fix="give an SC-MBM checkpoint of MinD-Vis (fmri_encoder.pth or checkpoint.pth).")
    embed_dim, _, patch_size = (int(v) for v in patch_weight.shape)
    pos_embed = _need(state, "pos_embed", path)
    if pos_embed.ndim != 3 or pos_embed.shape[1] < 2 or pos_embed.shape[2] != embed_dim:
        raise MindvisError(f"pos_embed has shape {tuple(pos_embed.shape)}; [1, 1 + tokens, {embed_dim}] is expected",
                           path=path, key="pos_embed",
                           fix="give an SC-MBM checkpoint of MinD-Vis (fmri_encoder.pth or checkpoint.pth).")
    n_tokens = int(pos_embed.shape[1]) - 1
    depth = _depth(state, "blocks")
    if depth == 0:
        raise MindvisError("no encoder blocks (blocks.0.*) in the state dict", path=path, key="blocks.0",
                           fix="give an SC-MBM checkpoint of MinD-Vis (fmri_encoder.pth or checkpoint.pth).")
    fc1 = _need(state, "blocks.0.mlp.fc1.weight", path)
    mlp_ratio = float(fc1.shape[0]) / embed_dim
    recorded = vars(pickled_config) if pickled_config is not None and hasattr(pickled_config, "__dict__") else {}

    def heads(explicit, name):
        if explicit:
            return int(explicit), "given"
        if isinstance(recorded.get(name), (int, np.integer)):
            return int(recorded[name]), "from the checkpoint's config"
        notes.append(f"{name} not recorded: assumed MinD-Vis's {MINDVIS_DEFAULT_HEADS}")
        return MINDVIS_DEFAULT_HEADS, "MinD-Vis default"

    n_heads, _ = heads(num_heads, "num_heads")
    decoder_depth = _depth(state, "decoder_blocks")
    if "decoder_embed.weight" in state and decoder_depth:
        decoder_embed_dim = int(state["decoder_embed.weight"].shape[0])
        n_decoder_heads, _ = heads(decoder_num_heads, "decoder_num_heads")
    else:
        from mindvis.models.mbm import PRESETS

        paper = PRESETS["paper"]
        decoder_embed_dim, decoder_depth = paper["decoder_embed_dim"], paper["decoder_depth"]
        n_decoder_heads = decoder_num_heads or paper["decoder_num_heads"]
        notes.append("the checkpoint holds no decoder: mindvis's paper-size decoder is initialised fresh")
    for name, value, width in (("num_heads", n_heads, embed_dim), ("decoder_num_heads", n_decoder_heads,
                                                                    decoder_embed_dim)):
        if width % value:
            raise MindvisError(f"{name} = {value} does not divide the width {width}", path=path, key=name,
                               fix=f"pass --{name.replace('_', '-')} with a divisor of {width}.")
    return dict(n_voxels=n_tokens * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=n_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                decoder_num_heads=n_decoder_heads, mlp_ratio=mlp_ratio), notes


def convert_state_dict(source_state, target_state, has_decoder):
    """Map MinD-Vis tensors onto a mindvis state dict, checking every name and shape.

    Parameters
    ----------
    source_state : dict of str -> Tensor
        MinD-Vis's state dict (``module.`` prefix removed).
    target_state : dict of str -> Tensor
        ``MBMAutoencoder(...).state_dict()`` of the inferred architecture.
    has_decoder : bool
        Whether the checkpoint holds MinD-Vis's decoder (then its ``mask_token`` is the decoder's).

    Returns
    -------
    new_state : dict
        ``target_state`` with every mapped tensor replaced.
    report : dict
        ``mapped`` {source: target}, ``not_mapped`` {source: reason},
        ``not_in_checkpoint`` [target keys left at initialisation],
        ``shape_mismatch`` {source: "source shape -> target shape"}.
    """
    new_state = dict(target_state)
    mapped, not_mapped, mismatched = {}, {}, {}
    for key, tensor in source_state.items():
        target = map_key(key)
        if key == "mask_token":
            target = "mask_token" if has_decoder else None
            if target is None:
                not_mapped[key] = "the encoder-only mask token; mindvis's encoder never sees mask tokens"
                continue
        if target is None:
            not_mapped[key] = ("MinD-Vis's optional image-reconstruction decoder (not part of SC-MBM here)"
                               if key.startswith("nature_img") else "no counterpart in mindvis's SC-MBM")
            continue
        if target not in target_state:
            not_mapped[key] = f"maps to '{target}', which the inferred mindvis model lacks"
            continue
        if tuple(tensor.shape) != tuple(target_state[target].shape):
            mismatched[key] = f"{tuple(tensor.shape)} -> {target} {tuple(target_state[target].shape)}"
            continue
        new_state[target] = tensor.detach().to(target_state[target].dtype).clone()
        mapped[key] = target
    filled = set(mapped.values())
    missing = [key for key in target_state if key not in filled]
    return new_state, {"mapped": mapped, "not_mapped": not_mapped, "not_in_checkpoint": missing,
                       "shape_mismatch": mismatched}


def import_mindvis_checkpoint(checkpoint, out_dir, num_heads=None, decoder_num_heads=None, strict=False):
    """Convert MinD-Vis's ``fmri_encoder.pth`` into a mindvis SC-MBM folder.

    Parameters
    ----------
    checkpoint : str or Path
        The ``.pth`` file (its state dict under ``model``, or a bare state dict).
    out_dir : str or Path
        Receives ``config.json`` + ``diffusion_pytorch_model.safetensors`` (load with
        ``MBMAutoencoder.from_pretrained(out_dir)``) and ``import_report.json``.
    num_heads, decoder_num_heads : int, optional
        Head counts when the checkpoint does not record them.
    strict : bool
        Fail when any tensor is not mapped or any mindvis tensor is left unfilled.

    Returns
    -------
    dict
        The import report (also written as ``import_report.json``).

    Raises
    ------
    MindvisError
        Naming the file and the tensor whose name or shape does not fit.
    """
    import torch

    from mindvis.models.mbm import MBMAutoencoder, sincos_positions

    path = Path(checkpoint)
    if not path.exists():
        raise MindvisError("checkpoint not found", path=path, fix="give the path of MinD-Vis's fmri_encoder.pth.")
    loaded, stand_ins = load_pickled_checkpoint(path)
    if isinstance(loaded, dict) and "model" in loaded:
        state, pickled_config = loaded["model"], loaded.get("config")
    elif isinstance(loaded, dict) and all(torch.is_tensor(v) for v in loaded.values()):
        state, pickled_config = loaded, None
    else:
        raise MindvisError("no state dict under 'model'", path=path, key="model",
                           fix="give the fmri_encoder.pth / checkpoint.pth MinD-Vis saves.")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise MindvisError("'model' is not a state dict of tensors", path=path, key="model",
                           fix="give the fmri_encoder.pth / checkpoint.pth MinD-Vis saves.")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}

    architecture, notes = infer_architecture(state, pickled_config, num_heads, decoder_num_heads, path)
    has_decoder = "decoder_embed.weight" in state
    torch.manual_seed(0)  # tensors the checkpoint lacks get a reproducible fresh start
    model = MBMAutoencoder(**architecture)
    new_state, report = convert_state_dict(state, model.state_dict(), has_decoder)
    if report["shape_mismatch"]:
        lines = "; ".join(f"{k}: {v}" for k, v in report["shape_mismatch"].items())
        raise MindvisError(f"tensor shapes do not fit the inferred model: {lines}", path=path,
                           key=next(iter(report["shape_mismatch"])),
                           fix="check --num-heads / the checkpoint; every block must have the same widths.")
    if strict and (report["not_mapped"] or report["not_in_checkpoint"]):
        raise MindvisError(f"{len(report['not_mapped'])} tensors not mapped "
                           f"({', '.join(list(report['not_mapped'])[:5])})"
                           f" and {len(report['not_in_checkpoint'])} mindvis tensors not filled "
                           f"({', '.join(report['not_in_checkpoint'][:5])})", path=path,
                           key=next(iter(report["not_mapped"]), None) or report["not_in_checkpoint"][0],
                           fix="drop --strict to import what maps (unmapped parts are listed in import_report.json).")
    model.load_state_dict(new_state, strict=True)

    # MinD-Vis's position table is the same fixed 1-D sine-cosine table: record how close it is.
    expected = sincos_positions(architecture["n_voxels"] // architecture["patch_size"], architecture["embed_dim"])
    table_difference = float((state["pos_embed"][0, 1:].float() - expected).abs().max())
    if table_difference > 1e-4:
        notes.append(f"pos_embed differs from mindvis's sine-cosine table by up to {table_difference:.3g}: "
                     "the checkpoint's table is kept")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".import-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            os.replace(Path(tmp) / name, out_dir / name)
    full_report = {
        "source": str(path), "source_sha256": sha256_file(path), "architecture": architecture,
        "n_tensors_in_checkpoint": len(state), "n_mapped": len(report["mapped"]),
        "pickled_classes_replaced": stand_ins, "pos_embed_max_difference_from_sincos": table_difference,
        "notes": notes, **report, "versions": software_versions(),
    }
    write_json_atomic(out_dir / "import_report.json", full_report)
    log.info("imported %d of %d tensors from %s (%d not mapped, %d mindvis tensors left at initialisation)",
             len(report["mapped"]), len(state), path, len(report["not_mapped"]), len(report["not_in_checkpoint"]))
    for key, reason in report["not_mapped"].items():
        log.warning("not mapped: %s (%s)", key, reason)
    return full_report

"""Module weights <-> safetensors files, never pickle: the one writer and reader of every model's tensors.

:func:`save_weights` writes a module's state dict (or only its trainable part)
atomically; :func:`load_weights` reads it back and names the file and the fix
when it does not fit. The training engine's checkpoints and the fine-tuned
DC-LDM (:mod:`mindvis.models.dcldm`) use them.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from mindvis.errors import MindvisError
from mindvis.utils.io import atomic_path


def module_tensors(model, which="all", always=()):
    """The tensors a checkpoint stores: the state dict, or only trainable parameters and buffers
    (plus every tensor whose name starts with one of ``always``)."""
    if which == "trainable":
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
        tensors.update(dict(model.named_buffers()))
        if always:
            tensors.update({name: t for name, t in model.state_dict().items() if name.startswith(tuple(always))})
    else:
        tensors = model.state_dict()
    out, seen = {}, {}
    for name, tensor in tensors.items():
        # safetensors refuses shared storage (tied weights): store a tied tensor once per name, copied.
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        out[name] = tensor.detach().cpu().clone() if key in seen else tensor.detach().cpu().contiguous()
        seen[key] = name
    return out


def save_weights(model, path, which="all", metadata=None, always=()):
    """Write a module's weights to ``path`` as safetensors, atomically.

    Parameters
    ----------
    model : torch.nn.Module
    path : str or Path
    which : {'all', 'trainable'}
        The whole state dict, or trainable parameters and buffers only (for
        fine-tuning a large frozen model).
    metadata : dict of str -> str, optional
        Stored in the safetensors header.
    always : sequence of str
        Name prefixes stored even when frozen (with ``which='trainable'``).
    """
    with atomic_path(path) as tmp:
        save_file(module_tensors(model, which, always), str(tmp), metadata=metadata)


def read_safetensors(path):
    """The tensors of a safetensors file (never unpickled), or a :class:`MindvisError` naming the file.

    A truncated file, a pickled ``.pth`` under a ``.safetensors`` name or a folder all fail here, before
    anything is loaded into a model.
    """
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        reason = " ".join(str(err).split())
        raise MindvisError(f"not a readable safetensors file ({reason})", path=path,
                           fix="rewrite it with save_weights (safetensors); a torch .pth must be converted first, "
                               "and a truncated file rewritten by rerunning its stage.") from None


def load_weights(model, path, strict=True):
    """Load safetensors weights written by :func:`save_weights` into ``model``.

    Raises
    ------
    MindvisError
        When the file is missing or does not fit the model.
    """
    path = Path(path)
    if not path.exists():
        raise MindvisError("weights file not found", path=path, fix="train the stage first, or point at its output.")
    tensors = read_safetensors(path)
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise MindvisError(f"tensor has shape {tuple(tensor.shape)} but the model's has "
                               f"{tuple(expected[name].shape)}", path=path, key=name,
                               fix="load them into a model built from the config stored beside them.")
    result = model.load_state_dict(tensors, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise MindvisError(f"weights do not fit the model (missing {result.missing_keys[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]})", path=path,
                           fix="load them into a model built from the config stored beside them.")
    return model

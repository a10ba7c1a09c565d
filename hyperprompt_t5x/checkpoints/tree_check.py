"""One check of a checkpoint's parameter tree against the model's, for every restore.

Trees are compared by '/'-joined names: parameters missing from the checkpoint,
unexpected in it, and of another shape (and dtype, where both sides carry one).
The error lists each kind with its count and the first names.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import jax
import numpy as np

from hyperprompt_t5x.checkpoints.errors import CheckpointMismatchError

Signature = Tuple[Optional[tuple], Optional[str]]


def signature(leaf: Any, with_dtype: bool = True) -> Signature:
  """(shape, dtype name) of an array, ShapeDtypeStruct or orbax metadata leaf; None
  for what the leaf does not carry (or what is not compared)."""
  shape = getattr(leaf, 'shape', None)
  dtype = getattr(leaf, 'dtype', None) if with_dtype else None
  return (tuple(shape) if isinstance(shape, (tuple, list)) else None,
          str(np.dtype(dtype)) if dtype is not None else None)


def path_name(path) -> str:
  """A jax tree path -> 'encoder/layers_0/.../kernel'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def flat_signatures(tree: Any, with_dtype: bool = True) -> dict:
  """A tree (nested mappings, flax structs) -> {'encoder/.../kernel': (shape, dtype)}."""
  return {path_name(path): signature(leaf, with_dtype)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _text(sig: Signature) -> str:
  shape, dtype = sig
  return f'{shape}' + (f' {dtype}' if dtype else '')


def _differs(have: Signature, want: Signature) -> bool:
  return any(h is not None and w is not None and h != w for h, w in zip(have, want))


def problems(have: Mapping[str, Signature], want: Mapping[str, Signature],
             limit: int = 20) -> list:
  """What differs between flat signature maps (checkpoint `have`, model `want`)."""
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  wrong = [f'{n}: checkpoint {_text(have[n])}, model {_text(want[n])}'
           for n in sorted(set(want) & set(have)) if _differs(have[n], want[n])]
  return [f'{len(names)} {what}: {names[:limit]}' for what, names in (
      ('missing from the checkpoint', missing), ('unexpected in the checkpoint', unexpected),
      ('of another shape', wrong)) if names]


def check_fits(have_tree: Any, want_tree: Any, where: str,
               with_dtype: bool = True, hint: str = '') -> None:
  """Raises CheckpointMismatchError naming `where` and every difference of the trees."""
  found = problems(flat_signatures(have_tree, with_dtype), flat_signatures(want_tree, with_dtype))
  if found:
    raise CheckpointMismatchError(f'{where} does not fit the model{hint}: ' + '; '.join(found))

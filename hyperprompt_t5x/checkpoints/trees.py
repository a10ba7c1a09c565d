"""Parameter trees as checkpoints hold them: nested dicts keyed by T5X's names, and their
flat form {'encoder/layers_0/attention/query/kernel': leaf}."""
from typing import Any, Dict, Mapping

Params = Dict[str, Any]


def to_plain_dict(tree: Any) -> Any:
  """Nested Mapping (dict / FrozenDict) -> nested plain dict, leaves untouched."""
  if isinstance(tree, Mapping):
    return {k: to_plain_dict(v) for k, v in tree.items()}
  return tree


def flatten_params(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
  """Nested dict -> {'encoder/layers_0/attention/query/kernel': leaf}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, name))
    else:
      flat[name] = value
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> Params:
  """Inverse of `flatten_params`."""
  tree: Params = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree

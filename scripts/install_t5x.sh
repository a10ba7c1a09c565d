#!/usr/bin/env bash
# Installs the real T5X (google-research/t5x) at the pinned commit, with the two packages
# it names as git URLs (google/airio, google-research/jestimator), into a Python
# environment that already holds this project (pip install -e '.[test]').
#
#   usage: scripts/install_t5x.sh PYTHON        e.g. scripts/install_t5x.sh .venv/bin/python
#
# Each of the three comes from a local source archive <name>-<7-char commit>.tar.gz when the
# folder $HYPERPROMPT_VENDOR (default: ../shared/vendor beside the checkout) has one, and
# otherwise from its public git repository at the same commit. --no-deps: T5X's other
# requirements (jax, flax, optax, orbax, clu, seqio, gin, tensorstore, tensorflow) are the
# project's pins; the three small packages T5X imports beyond them come from the index.
set -euo pipefail
PY=${1:?usage: install_t5x.sh PYTHON}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENDOR=${HYPERPROMPT_VENDOR:-$ROOT/../shared/vendor}

# name  repository  commit
PINS=(
  "t5x google-research/t5x cc342d419ec3e3e9c4bf1df33c82330cafdc1e16"
  "airio google/airio 69897df7d9a427b947a9f7bb4164c7782b43e601"
  "jestimator google-research/jestimator 326824a477feef6d92e6f44175000907a72899ca"
)

sources=()
for pin in "${PINS[@]}"; do
  read -r name repo commit <<<"$pin"
  archive="$VENDOR/$name-${commit:0:7}.tar.gz"
  if [[ -f "$archive" ]]; then
    sources+=("$archive")
    echo "install_t5x: $name from $archive" >&2
  else
    sources+=("$name @ git+https://github.com/$repo@$commit")
    echo "install_t5x: $name from github.com/$repo at $commit (no $archive)" >&2
  fi
done

"$PY" -m pip install -q fiddle==0.3.1 cached_property==2.0.1 grain==0.2.18
"$PY" -m pip install -q --no-deps "${sources[@]}"
"$PY" -c "import t5x.train, t5x.models, t5x.partitioning; print('t5x installed:', t5x.__file__)"

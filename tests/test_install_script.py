"""scripts/install_t5x.sh (the README's test command runs it): local archives when the
vendor folder has them, else the public repositories at the same commits."""
import os
import pathlib
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'install_t5x.sh'
COMMITS = {'t5x': 'cc342d419ec3e3e9c4bf1df33c82330cafdc1e16',
           'airio': '69897df7d9a427b947a9f7bb4164c7782b43e601',
           'jestimator': '326824a477feef6d92e6f44175000907a72899ca'}
REPOS = {'t5x': 'google-research/t5x', 'airio': 'google/airio',
         'jestimator': 'google-research/jestimator'}


def _install(tmp_path, vendor) -> list:
  """The script with a stand-in PYTHON that records each call: the pip calls' arguments."""
  calls = tmp_path / 'calls'
  python = tmp_path / 'python'
  python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" "--" >> {calls}\n')
  python.chmod(0o755)
  env = dict(os.environ, HYPERPROMPT_VENDOR=str(vendor))
  subprocess.run(['bash', str(SCRIPT), str(python)], env=env, check=True, capture_output=True)
  return [c.strip('\n').split('\n') for c in calls.read_text().split('--\n') if c.strip()]


def test_installs_from_the_vendor_folder_when_it_has_the_archives(tmp_path):
  vendor = tmp_path / 'vendor'
  vendor.mkdir()
  for name, commit in COMMITS.items():
    (vendor / f'{name}-{commit[:7]}.tar.gz').write_bytes(b'')
  index, pinned, check = _install(tmp_path, vendor)
  assert index == ['-m', 'pip', 'install', '-q', 'fiddle==0.3.1', 'cached_property==2.0.1',
                   'grain==0.2.18']
  assert pinned == ['-m', 'pip', 'install', '-q', '--no-deps',
                    *[str(vendor / f'{n}-{c[:7]}.tar.gz') for n, c in COMMITS.items()]]
  assert check[0] == '-c' and 'import t5x.train' in check[1]


def test_installs_from_the_public_repositories_at_the_same_commits(tmp_path):
  _, pinned, _ = _install(tmp_path, tmp_path / 'no_such_folder')
  assert pinned[5:] == [f'{n} @ git+https://github.com/{REPOS[n]}@{c}'
                        for n, c in COMMITS.items()]


def test_the_shared_vendor_folder_holds_the_pinned_archives():
  """$HYPERPROMPT_VENDOR, default ../shared/vendor, has the archives of exactly these commits."""
  vendor = pathlib.Path(os.environ.get('HYPERPROMPT_VENDOR', SCRIPT.parents[2] / 'shared' / 'vendor'))
  if not vendor.is_dir():
    pytest.skip(f'{vendor} is missing (the script then installs from GitHub)')
  for name, commit in COMMITS.items():
    assert (vendor / f'{name}-{commit[:7]}.tar.gz').is_file(), name

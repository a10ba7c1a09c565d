"""bench/compare_methods.py: a two-step smoke of the whole pipeline, and its data readers.

Scores and timings come from running the script (docs/RESULTS.md), not from here.
"""
import json
import pathlib
import sys

REPO = next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from bench import compare_methods  # noqa: E402


def test_two_step_smoke_writes_tables_plots_and_json(tmp_path):
  out = tmp_path / 'cmp'
  # 'none' has no conditioning to train alone: only global/conditioning runs (one
  # compilation), from a backbone pre-trained for one step (another).
  compare_methods.main(['--out_dir', str(out), '--methods', 'none,global',
                        '--freeze', 'conditioning', '--steps', '2', '--eval_every', '1',
                        '--pretrain_steps', '1', '--lrs', '1e-3,3e-3', '--seeds', '0',
                        '--batch', '8'])
  results = json.loads((out / 'results.json').read_text())
  runs = [(r['method'], r['freeze']) for r in results['conflict']]
  assert runs == [('global', 'conditioning')]
  for r in results['conflict']:
    assert [e['step'] for e in r['evals']] == [1, 2]
    scores = r['evals'][-1]['scores']
    assert len(scores) == 2 and len(scores[0]) == 6  # [lrs, tasks]
    assert all(0.0 <= s <= 1.0 for row in scores for s in row)
  assert results['conflict'][0]['trainable_params'] == results['conflict'][0]['added_params'] > 0
  table = (out / 'results.md').read_text()
  assert '| global | conditioning |' in table and 'missing' in table
  for name in ('conflict_score_vs_step.png', 'conflict_score_vs_params.png'):
    assert (out / name).stat().st_size > 1000
  # A sweep run in pieces: --merge writes the union of the pieces' records and commands.
  other = json.loads((out / 'results.json').read_text())
  other['meta']['command'] = 'python bench/compare_methods.py --methods sep'
  other['conflict'][0]['method'] = 'sep'
  (tmp_path / 'other.json').write_text(json.dumps(other))
  rerun = json.loads((out / 'results.json').read_text())
  rerun['meta']['command'] += ' --rerun'
  rerun['conflict'][0]['step_ms_vmapped'] = -1.0
  (tmp_path / 'rerun.json').write_text(json.dumps(rerun))
  merged = compare_methods.main(['--out_dir', str(tmp_path / 'merged'), '--merge',
                                 f"{out / 'results.json'},{tmp_path / 'other.json'},"
                                 f"{tmp_path / 'rerun.json'}"])
  assert [r['method'] for r in merged['conflict']] == ['sep', 'global']  # METHODS order
  # The rerun of global/conditioning replaced the first run's record.
  assert merged['conflict'][1]['step_ms_vmapped'] == -1.0
  table = (tmp_path / 'merged' / 'results.md').read_text()
  assert '| global | conditioning |' in table and '| sep | conditioning |' in table
  assert results['meta']['command'] in table and '--methods sep`' in table


def test_conflicting_targets_and_glue_readers(shared_data):
  names, train, val = compare_methods.conflict_data()
  assert names == ['max', 'min', 'max_next', 'min_next', 'has_a', 'missing']
  word = train[0][0]
  answers = [t for w, t, _ in train if w == word]
  assert len(answers) == 6 and answers[0] != answers[2]  # max vs max_next conflict
  g_names, g_train, g_val = compare_methods.glue_data(shared_data)
  counts = {n: sum(k == i for _, _, k in g_train) for i, n in enumerate(g_names)}
  assert counts == {'rte': 2490, 'mrpc': 3668, 'cb': 250, 'copa': 400}
  assert len(g_val) == 277 + 408 + 56 + 100
  assert {t for _, t, _ in g_train} == {'0', '1', '2'}
  assert compare_methods.freeze_modes('none', ['all', 'conditioning', 'prompts']) == ['all']
  assert compare_methods.freeze_modes('hyperformer', ['all', 'conditioning', 'prompts']) == [
      'all', 'conditioning']

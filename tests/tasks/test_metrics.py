"""Metrics through `compute_metrics` (the task's postprocessor + metric_fns).

Perfect predictions give 100; mixed cases give what sklearn/scipy give on the
same labels; text that is no label counts as wrong.
"""
import numpy as np
import pytest

seqio = pytest.importorskip('seqio')
scipy_stats = pytest.importorskip('scipy.stats')
sk_metrics = pytest.importorskip('sklearn.metrics')

from hyperprompt_t5x import tasks  # noqa: E402


def _targets(task, texts):
  """Postprocessed targets, as get_eval_datasets makes them (label-only tasks)."""
  t = seqio.get_mixture_or_task(task)
  return [t.postprocess_fn(x, example=None, is_target=True) for x in texts]


CLASSIFICATION = [
    ('hyperprompt_glue_cola', ['acceptable', 'unacceptable', 'acceptable', 'acceptable']),
    ('hyperprompt_glue_sst2', ['positive', 'negative', 'negative']),
    ('hyperprompt_glue_mrpc', ['equivalent', 'not_equivalent', 'equivalent']),
    ('hyperprompt_glue_qqp', ['duplicate', 'not_duplicate']),
    ('hyperprompt_glue_mnli_matched', ['entailment', 'neutral', 'contradiction']),
    ('hyperprompt_glue_qnli', ['entailment', 'not_entailment']),
    ('hyperprompt_glue_rte', ['entailment', 'not_entailment']),
    ('hyperprompt_glue_wnli', ['entailment', 'not_entailment']),
    ('hyperprompt_super_glue_boolq', ['True', 'False']),
    ('hyperprompt_super_glue_cb', ['entailment', 'contradiction', 'neutral']),
    ('hyperprompt_super_glue_copa', ['choice1', 'choice2']),
    ('hyperprompt_super_glue_rte', ['entailment', 'not_entailment']),
    ('hyperprompt_super_glue_wic', ['True', 'False']),
    ('hyperprompt_super_glue_wsc', ['False', 'True']),
    ('hyperprompt_demo_max', ['a', 'h', 'c']),
    ('hyperprompt_demo_has_a', ['y', 'n']),
]


@pytest.mark.parametrize('task,texts', CLASSIFICATION, ids=[t for t, _ in CLASSIFICATION])
def test_perfect_predictions_give_100(task, texts):
  results = tasks.compute_metrics(task, _targets(task, texts), texts)
  assert results and all(v == pytest.approx(100.0) for v in results.values()), results


@pytest.mark.parametrize('task', ['hyperprompt_glue_rte', 'hyperprompt_super_glue_boolq',
                                  'hyperprompt_glue_mnli_mismatched'])
def test_garbage_is_wrong_not_a_crash(task):
  texts = {'hyperprompt_glue_rte': ['entailment', 'not_entailment'],
           'hyperprompt_super_glue_boolq': ['True', 'False'],
           'hyperprompt_glue_mnli_mismatched': ['neutral', 'entailment']}[task]
  predictions = [texts[0], 'Entailment!']  # second: not a label
  results = tasks.compute_metrics(task, _targets(task, texts), predictions)
  assert results == {'accuracy': pytest.approx(50.0)}


def test_cola_matthews_equals_sklearn():
  targets = ['acceptable', 'acceptable', 'unacceptable', 'unacceptable', 'acceptable', 'acceptable']
  preds = ['acceptable', 'unacceptable', 'unacceptable', 'acceptable', 'acceptable', 'xx']
  t = [1, 1, 0, 0, 1, 1]
  p = [1, 0, 0, 1, 1, -1]  # garbage -> -1
  got = tasks.compute_metrics('hyperprompt_glue_cola', _targets('hyperprompt_glue_cola', targets),
                              preds)
  assert got['matthews_corrcoef'] == pytest.approx(100 * sk_metrics.matthews_corrcoef(t, p))


def test_mrpc_f1_and_accuracy_equal_sklearn_and_hand():
  targets = ['equivalent', 'equivalent', 'not_equivalent', 'equivalent', 'not_equivalent']
  preds = ['equivalent', 'not_equivalent', 'equivalent', 'garbage', 'not_equivalent']
  got = tasks.compute_metrics('hyperprompt_glue_mrpc', _targets('hyperprompt_glue_mrpc', targets),
                              preds)
  # By hand: TP=1, FP=1, FN=2 (the garbage one is a missed positive) -> F1 = 2/(2+1+2) = 0.4.
  assert got['f1'] == pytest.approx(40.0)
  assert got['f1'] == pytest.approx(100 * sk_metrics.f1_score([1, 1, 0, 1, 0], [1, 0, 1, 0, 0]))
  assert got['accuracy'] == pytest.approx(40.0)


def test_stsb_correlations_equal_scipy_and_garbage_is_wrong():
  targets = ['5.0', '3.8', '1.2', '0.0', '2.6']
  preds = ['4.4', '3.0', '2.0', 'none', '2.6']
  t = [5.0, 3.8, 1.2, 0.0, 2.6]
  p = [4.4, 3.0, 2.0, -1.0, 2.6]  # garbage -> -1
  got = tasks.compute_metrics('hyperprompt_glue_stsb', _targets('hyperprompt_glue_stsb', targets),
                              preds)
  assert got['pearson_corrcoef'] == pytest.approx(100 * scipy_stats.pearsonr(t, p)[0])
  assert got['spearman_corrcoef'] == pytest.approx(100 * scipy_stats.spearmanr(t, p)[0])
  perfect = tasks.compute_metrics('hyperprompt_glue_stsb',
                                  _targets('hyperprompt_glue_stsb', targets), targets)
  assert perfect == {'pearson_corrcoef': pytest.approx(100.0),
                     'spearman_corrcoef': pytest.approx(100.0)}


def test_cb_macro_f1_equals_sklearn():
  targets = ['entailment', 'contradiction', 'neutral', 'entailment', 'contradiction', 'neutral']
  preds = ['entailment', 'entailment', 'neutral', 'entailment', 'contradiction', '???']
  t = [0, 1, 2, 0, 1, 2]
  p = [0, 0, 2, 0, 1, -1]
  got = tasks.compute_metrics('hyperprompt_super_glue_cb',
                              _targets('hyperprompt_super_glue_cb', targets), preds)
  per_class = sk_metrics.f1_score(t, p, labels=[0, 1, 2], average=None)
  assert got['mean_3class_f1'] == pytest.approx(100 * np.mean(per_class))
  assert got['accuracy'] == pytest.approx(100 * 4 / 6)


def test_multirc_f1a_and_exact_match_by_hand():
  task = seqio.get_mixture_or_task('hyperprompt_super_glue_multirc')
  rows = [((0, 0), 'True'), ((0, 0), 'False'), ((0, 1), 'True'), ((0, 1), 'True'), ((1, 0), 'False')]
  targets = [task.postprocess_fn(text, example={'idx/paragraph': g[0], 'idx/question': g[1]},
                                 is_target=True) for g, text in rows]
  preds = ['True', 'False', 'True', 'maybe', 'False']
  got = tasks.compute_metrics('hyperprompt_super_glue_multirc', targets, preds)
  # Question (0,0) all right, (0,1) one wrong, (1,0) right -> EM 2/3.
  assert got['exact_match'] == pytest.approx(100 * 2 / 3)
  # Answers: TP=2, FN=1 (the 'maybe'), FP=0 -> F1a = 2*2/(2*2+1) = 0.8.
  assert got['f1a'] == pytest.approx(80.0)


def test_record_max_over_answers_by_hand():
  targets = [['Louvre', 'Paris'], ['Anna'], ['Ben Smith']]
  preds = ['the Louvre', 'Ben', 'Ben']
  got = tasks.compute_metrics('hyperprompt_super_glue_record', targets, preds)
  # EM: 1 (article dropped), 0, 0. F1: 1, 0, token F1('Ben', 'Ben Smith') = 2*1*0.5/1.5 = 2/3.
  assert got['em'] == pytest.approx(100 / 3)
  assert got['f1'] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)


def test_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    tasks.compute_metrics('hyperprompt_glue_rte', [0, 1], ['entailment'])

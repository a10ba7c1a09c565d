"""Every shipped gin file parses and describes the model it says; gin errors are clear."""
import pathlib

import pytest

from hyperprompt_t5x import gin_config
from hyperprompt_t5x.model.methods import METHODS

# T5 1.1 shapes (docs/METHODS.md, Parameter tree; T5X's t5_1_1/*.gin): emb, heads, enc/dec layers, head_dim, mlp.
T5_1_1 = {
    'small': (512, 6, 8, 64, 1024),
    'base': (768, 12, 12, 64, 2048),
    'large': (1024, 16, 24, 64, 2816),
    'xl': (2048, 32, 24, 64, 5120),
    'xxl': (4096, 64, 24, 64, 10240),
}
METHOD_OF = {'hyperprompt_share': 'share', 'hyperprompt_sep': 'sep',
             'hyperprompt_global': 'global', 'mtl': 'none',
             'prompt_tuning': 'prompt_tuning', 'hyperformer': 'hyperformer'}


def _gin_dir() -> pathlib.Path:
  dirs = gin_config.installed_gin_dirs()
  assert dirs, 'no installed gin folder found'
  return dirs[0]


def _shape(config):
  return (config.emb_dim, config.num_heads, config.num_encoder_layers, config.head_dim,
          config.mlp_dim)


def _build(files, **macros):
  """The T5Config of `files` (with MODEL_DIR bound where a run gin asks for it)."""
  gin_config.parse(files)
  if 'MODEL_DIR' in gin_config.defined_macros():
    macros['MODEL_DIR'] = '/tmp/unused'
  gin_config.parse(files, macros=[(k, repr(v)) for k, v in macros.items()])
  return gin_config.model_config()


def test_every_shipped_gin_file_is_covered_and_parses():
  root = _gin_dir()
  # gin/t5x/ holds the files for T5X's own entry points (tests/test_t5x_gin.py).
  found = sorted(str(p.relative_to(root)) for p in root.rglob('*.gin')
                 if p.relative_to(root).parts[0] != 't5x')
  expected = sorted(
      [f'models/{s}.gin' for s in ['tiny', *T5_1_1]]
      + [f'methods/{m}.gin' for m in METHOD_OF] + ['methods/conditioning.gin']
      + [f'runs/{r}.gin' for r in ('finetune', 'eval', 'infer')]
      + [f'hyperprompt_{s}.gin' for s in T5_1_1] + ['demo.gin'])
  assert found == expected
  assert not (root / '__init__.py').exists(), 'gin/__init__.py would shadow gin-config'


@pytest.mark.parametrize('size', sorted(T5_1_1))
def test_model_gin_gives_t5_1_1_shape(size):
  config = _build([f'models/{size}.gin'])
  assert _shape(config) == T5_1_1[size]
  assert config.num_decoder_layers == config.num_encoder_layers
  assert config.vocab_size == 32128 and not config.logits_via_embedding
  assert config.mlp_activations == ('gelu', 'linear')


def test_tiny_gin_matches_from_size():
  from hyperprompt_t5x.model.network import T5Config
  config = _build(['models/tiny.gin'])
  reference = T5Config.from_size('tiny')
  for field in ('emb_dim', 'num_heads', 'num_encoder_layers', 'num_decoder_layers',
                'head_dim', 'mlp_dim', 'vocab_size'):
    assert getattr(config, field) == getattr(reference, field), field


@pytest.mark.parametrize('method', sorted(METHOD_OF))
def test_method_gin_sets_method(method):
  config = _build(['models/tiny.gin', f'methods/{method}.gin'], NUM_TASKS=5)
  assert config.method == METHOD_OF[method]
  assert config.num_tasks == 5


@pytest.mark.parametrize('size', sorted(T5_1_1))
def test_hyperprompt_size_gin(size):
  config = _build([f'hyperprompt_{size}.gin'])
  assert _shape(config) == T5_1_1[size]
  assert config.method == 'global' and config.num_tasks == 8
  import gin
  assert gin.query_parameter('%INITIAL_CHECKPOINT_PATH') == (
      f'gs://t5-data/pretrained_models/t5x/t5_1_1_{size}/checkpoint_1000000')
  assert gin.query_parameter('%MIXTURE_OR_TASK_NAME') == 'hyperprompt_glue'
  gin_config.check_required('train')  # everything but MODEL_DIR has a value


def test_demo_gin():
  config = _build(['demo.gin'])
  assert config.method == 'global' and config.num_tasks == 3
  import gin
  assert gin.query_parameter('%MIXTURE_OR_TASK_NAME') == 'hyperprompt_demo'
  for command in ('train', 'evaluate', 'infer'):
    gin_config.check_required(command)


def test_t5x_macro_names_in_finetune_gin():
  gin_config.parse(['runs/finetune.gin'])
  assert {'MODEL_DIR', 'MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS', 'TRAIN_STEPS',
          'BATCH_SIZE', 'INITIAL_CHECKPOINT_PATH', 'EVAL_PERIOD', 'SAVE_PERIOD',
          'LEARNING_RATE', 'NUM_PARTITIONS'} <= set(
              gin_config.defined_macros())
  gin_config.parse(['models/base.gin'])
  assert 'DROPOUT_RATE' in gin_config.defined_macros()


def test_unknown_gin_file_lists_where_it_looked(tmp_path):
  with pytest.raises(gin_config.GinConfigError) as e:
    gin_config.parse(['no_such.gin'], gin_search_paths=[str(tmp_path)])
  message = str(e.value)
  assert 'no_such.gin' in message and str(tmp_path) in message
  assert str(_gin_dir()) in message


def test_gin_file_found_in_search_path(tmp_path):
  (tmp_path / 'mine.gin').write_text("include 'models/small.gin'\nT5Config.emb_dim = 48\n")
  gin_config.parse(['mine.gin'], gin_search_paths=[str(tmp_path)])
  assert gin_config.model_config().emb_dim == 48


def test_unknown_macro_and_binding_are_errors():
  with pytest.raises(gin_config.GinConfigError, match="unknown macro 'TRAIN_STEP'"):
    gin_config.parse(['demo.gin'], macros=[('TRAIN_STEP', '3')])
  with pytest.raises(gin_config.GinConfigError, match='emb_dims'):
    gin_config.parse(['demo.gin'], macros=[('T5Config.emb_dims', '3')])
  with pytest.raises(gin_config.GinConfigError, match="unknown macro 'BATCH'"):
    gin_config.parse(['demo.gin'], bindings=['BATCH = 3'])


def test_missing_required_macro_is_named():
  gin_config.parse(['demo.gin'])
  with pytest.raises(gin_config.GinConfigError, match='MODEL_DIR'):
    gin_config.check_required('train')
  gin_config.parse(['models/tiny.gin', 'methods/hyperprompt_global.gin'])
  with pytest.raises(gin_config.GinConfigError, match='NUM_TASKS'):
    gin_config.model_config()


def test_macro_values_from_the_command_line():
  gin_config.parse(['demo.gin'], macros=[
      ('MODEL_DIR', '/tmp/a b'), ('TRAIN_STEPS', '7'), ('INITIAL_CHECKPOINT_PATH', 'None'),
      ('MIXTURE_OR_TASK_NAME', "'hyperprompt_demo'"),
      ('TASK_FEATURE_LENGTHS', "{'inputs': 9, 'targets': 3}")])
  import gin
  assert gin.query_parameter('%MODEL_DIR') == '/tmp/a b'
  assert gin.query_parameter('%TRAIN_STEPS') == 7
  assert gin.query_parameter('%INITIAL_CHECKPOINT_PATH') is None
  assert gin.query_parameter('%MIXTURE_OR_TASK_NAME') == 'hyperprompt_demo'
  assert gin.query_parameter('%TASK_FEATURE_LENGTHS') == {'inputs': 9, 'targets': 3}


# ----------------------------------------------------------------------------
# --gin.METHOD: one top-level file, any method, the file's sizes kept.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('top', ['demo.gin'] + [f'hyperprompt_{s}.gin' for s in T5_1_1])
def test_method_macro_switches_method_and_keeps_the_files_sizes(top):
  default = _build([top])
  for method in METHODS:
    config = _build([top], METHOD=method)
    assert config.method == method
    for field in ('prompt_length', 'bottleneck', 'task_embed_dim', 'layer_task_dim',
                  'adapter_dim', 'num_tasks', 'emb_dim', 'dropout_rate'):
      assert getattr(config, field) == getattr(default, field), (method, field)


def test_demo_sizes_survive_a_method_switch():
  config = _build(['demo.gin'], METHOD='share')
  assert (config.prompt_length, config.bottleneck, config.task_embed_dim) == (4, 16, 16)


def test_unknown_method_lists_the_valid_ones():
  with pytest.raises(gin_config.GinConfigError) as e:
    gin_config.parse(['demo.gin'], macros=[('METHOD', 'shar')])
  assert "did you mean 'share'" in str(e.value)
  for name in METHODS:
    assert name in str(e.value)


@pytest.mark.parametrize('files', [['demo.gin', 'methods/hyperprompt_share.gin'],
                                   ['methods/mtl.gin', 'hyperprompt_small.gin']])
def test_a_second_method_file_is_refused_not_ignored(files):
  with pytest.raises(gin_config.GinConfigError, match=r'--gin\.METHOD=') as e:
    gin_config.parse(files)
  assert files[0] in str(e.value) and files[1] in str(e.value)


def test_parts_with_one_method_file_still_compose():
  config = _build(['models/tiny.gin', 'methods/hyperprompt_sep.gin'], NUM_TASKS=2)
  assert config.method == 'sep'


def test_did_you_mean_for_macro_and_gin_file():
  with pytest.raises(gin_config.GinConfigError, match="did you mean 'TRAIN_STEPS'"):
    gin_config.parse(['demo.gin'], macros=[('TRAIN_STEP', '3')])
  with pytest.raises(gin_config.GinConfigError, match="did you mean 'demo.gin'"):
    gin_config.parse(['dmeo.gin'])

"""The LSTM language model family: model, data and generation (``model.py``), its serving signatures
(``serving.py``) and benchmark hooks (``timing.py``), registered together; the hooks import their module
when called, so training imports neither the export nor the benchmark package.

``from tfmstep.models import lstm_lm`` gives the names other modules use (``lstm_lm.make_step_fn``,
``lstm_lm.tokenized_corpus``, ...)."""

from tfmstep.models.lstm_lm.model import (DECODERS, LSTMConfig, OutputBias, TiedEmbedding, bits_per_byte,
                                          build_lstm_lm, generate_text, headline_metrics, initial_state,
                                          lm_dataset, lm_loss, lstm_layers, make_step_fn, make_tokenizer,
                                          token_splits, tokenized_corpus)
from tfmstep.data import text as text_data
from tfmstep.registry import register


def generate(model, config, prompt, **options):
    """The ``generate`` hook: ``generate_text`` with the config's tokenizer."""
    return generate_text(model, prompt, tokenizer=make_tokenizer(config), **options)


def lstm_servable(name, model, config):
    """The ``servable`` hook (``serving.py`` imports the export package, so only when exporting)."""
    from tfmstep.models.lstm_lm import serving

    return serving.lstm_servable(name, model, config)


def per_token_times(model, config, **kwargs):
    """The ``inference_timer`` hook (``timing.py``)."""
    from tfmstep.models.lstm_lm import timing

    return timing.per_token_times(model, config, **kwargs)


def forward_flops(config) -> float:
    """The ``forward_flops`` hook (``timing.py``)."""
    from tfmstep.models.lstm_lm import timing

    return timing.forward_flops(config)


register(
    "lstm_lm", config_class=LSTMConfig, loss=lm_loss, dataset=lm_dataset,
    presets={
        "tiny": dict(embedding_dim=16, units=32, seq_len=32, eval_context=16, max_corpus_bytes=100_000,
                     dropout=0.0),
    },
    # Measured on a 2-core CPU (benchmarks/README.md): the XLA-compiled LSTM step ran ~4x slower.
    xla_on_cpu=False,
    servable=lstm_servable, generate=generate, inference_timer=per_token_times, forward_flops=forward_flops,
    validate_data=text_data.validate_config, headline=headline_metrics, token_corpus=tokenized_corpus,
    assets=("vocab_file",),  # the SentencePiece vocabulary travels with a saved model
)(build_lstm_lm)

__all__ = ["DECODERS", "LSTMConfig", "OutputBias", "TiedEmbedding", "bits_per_byte", "build_lstm_lm",
           "generate_text", "headline_metrics", "initial_state", "lm_dataset", "lm_loss", "lstm_layers",
           "make_step_fn", "make_tokenizer", "token_splits", "tokenized_corpus"]

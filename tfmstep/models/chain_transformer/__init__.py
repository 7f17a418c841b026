"""The chain reasoner family: model (``model.py``), serving signatures (``serving.py``), the
accuracy-vs-chain-length evaluation (``evaluate.py``) and its inference timer, registered together."""

from tfmstep.models.chain_transformer.model import (INFERENCE_FIELDS, ChainConfig, ChainTransformer,
                                                    build_chain_transformer, chain_dataset, chain_loss,
                                                    chain_metrics, validate_chain_data)
from tfmstep.models.chain_transformer import evaluate, serving
from tfmstep.registry import register

register(
    "chain_transformer", config_class=ChainConfig, loss=chain_loss, dataset=chain_dataset,
    presets={
        "tiny": dict(train_max_len=3, test_max_len=6, width=16, heads=2, mlp_dim=32, prelude_layers=1,
                     layers=2, max_loops=12, eval_examples=64),
        # Looped, ~0.2M parameters.
        "default": dict(),
        # Non-looped: prelude, `layers` distinct blocks, coda; about the looped default's parameters.
        "baseline": dict(looped=False, width=40, heads=4, mlp_dim=160, layers=8),
    },
    servable=serving.chain_servable, evaluate=evaluate.evaluate_runs,
    inference_timer=evaluate.per_loop_times, validate_data=validate_chain_data,
    assets=("vocab_file",),  # a file task's SentencePiece vocabulary travels with a saved model
    inference_fields=INFERENCE_FIELDS,
)(build_chain_transformer)

__all__ = ["ChainConfig", "ChainTransformer", "build_chain_transformer", "chain_loss", "chain_metrics",
           "chain_dataset"]

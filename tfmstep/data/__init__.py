"""Input pipelines. Every train stream is indexed: batch k depends only on (seed, k), so a resumed run
rebuilds the stream at its checkpointed position instead of replaying or skipping data."""

"""Side-by-side measurements, one module a job:

  training.py   training throughput: the shared step vs Keras fit vs an eager loop, and the setting the
                trainer's auto-tuning picks (the "tfmstep auto" row)
  flops.py      training FLOPs per example and this machine's matmul peak (model FLOPs utilisation)
  inference.py  per-step inference time of every family that registers an ``inference_timer``
  serving.py    served-path latency: the Keras call, the SavedModel signature, each TF-Lite file; and a
                trained model's accuracy and latency served in float32, bfloat16 and int8
  scaling.py    one vs two MultiWorkerMirroredStrategy workers on localhost
  report.py     results.json, README.md tables and plots
  timing.py     the timing primitives they share (families' inference timers use them too)

Everything is measured in one process on the same batches, so the ratios are comparable even on a noisy
machine; absolute numbers are not. Nothing here asserts a time. The program is ``tfmstep-benchmark``
(``tfmstep/cli/benchmark.py``).
"""

SECTIONS = ("training", "inference", "serving", "served_precision", "scaling")  # here: the program's flags need no TensorFlow

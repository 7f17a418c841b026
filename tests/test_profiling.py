"""The step profiler reads real op times back from the TensorBoard trace it writes."""

import os

from tfmstep import profiling


def test_profile_of_cnn_step_names_its_convolutions_and_leaves_a_tensorboard_trace(tmp_path):
    report = profiling.profile_training_step("cnn_classifier", "tiny", batch_size=4, steps_per_call=2,
                                             calls=1, logdir=str(tmp_path / "trace"))
    op_types = [row["op_type"] for row in report["top_ops"]]
    assert any("Conv2D" in op for op in op_types), op_types
    assert report["compute_ms_per_step"] > 0
    assert 0 < report["compute_share_of_op_time"] <= 1
    assert report["wall_ms_per_step"] > 0 and report["steps_profiled"] == 2
    assert os.path.exists(report["trace"]) and report["trace"].startswith(str(tmp_path))
    table = profiling.format_profile(report)
    assert "| op type |" in table and op_types[0] in table


def test_op_times_from_trace_without_a_trace_says_so(tmp_path):
    try:
        profiling.op_times_from_trace(str(tmp_path))
    except FileNotFoundError as e:
        assert str(tmp_path) in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")

"""Serve the SavedModels of a TF Serving model base locally: TF Serving's REST API (KServe's ModelServer)
and its gRPC PredictionService.

  tfmstep-serve --export_base=export/artifacts --rest_api_port=8501 --grpc_port=8500
  curl -s -d '{"instances": ["def main("]}' http://localhost:8501/v1/models/lstm_lm:predict
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("export_base", "export/artifacts", "TF Serving model base: <base>/<model>/<version>/.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("rest_api_port", 8501, "REST port (TF Serving's default).", lower_bound=1)
flags.DEFINE_integer("grpc_port", 8500, "gRPC PredictionService port (0: no gRPC).", lower_bound=0)
flags.DEFINE_float("poll_seconds", 0.0, "Look for new versions this often and load them (0: on restart only).",
                   lower_bound=0.0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from tfmstep.cli import exit_on_user_error
    from tfmstep.export import server

    with exit_on_user_error():
        server.serve(FLAGS.export_base, host=FLAGS.host, rest_api_port=FLAGS.rest_api_port,
                     grpc_port=FLAGS.grpc_port or None, poll_seconds=FLAGS.poll_seconds)


def run():
    from tfmstep.cli import run_program

    run_program(main, __name__)


if __name__ == "__main__":
    run()

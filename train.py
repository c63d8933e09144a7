r"""Train a segjax model from a config file.

  python train.py --config configs/mae/digits.py --workdir workdirs/mae_digits \
      [--config.total_steps=100 ...]

Re-running with the same workdir resumes from its newest checkpoint. A failure the
user can act on (invalid config, a workdir in use or written by another config, an
unreadable checkpoint, a full or read-only disk, a non-finite step) ends with one
line `error: ...` on stderr and exit status 1 (`--verbosity=1` adds its traceback).

Several hosts: start the same command on each with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (jax.distributed); on TPU pods and SLURM these are
detected automatically with `--distributed`.
"""


from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a python config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from segjax import runtime

    runtime.setup(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                  FLAGS.distributed)
    from segjax import train_loop

    logging.info("config:\n%s", FLAGS.config)
    train_loop.run_entry_point(train_loop.train, FLAGS.config, FLAGS.workdir, label="final")


if __name__ == "__main__":
    app.run(main)

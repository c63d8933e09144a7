r"""Evaluate the newest checkpoint in a workdir with its config.

  python eval.py --config configs/mae/digits.py --workdir workdirs/mae_digits
  python eval.py --config configs/classification/digits_finetune.py --workdir workdirs/digits_ft

MAE: reconstruction loss on the eval split and a PNG (masked / reconstruction / paste /
original) under workdir/images; classifier: top-1 accuracy; Mask R-CNN
(`--config configs/maskrcnn/shapes.py`): COCO box and mask AP (pycocotools), the
detections JSON under workdir/eval and a PNG of detections | ground truth under
workdir/images. Failures the user can act on (no readable checkpoint, a checkpoint of
another model, an invalid config) end with one line `error: ...` and exit status 1.
"""


from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a python config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir (or a checkpoint directory).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from segjax import runtime

    runtime.setup()
    from segjax import train_loop

    train_loop.run_entry_point(train_loop.evaluate_checkpoint, FLAGS.config, FLAGS.workdir, label="eval")


if __name__ == "__main__":
    app.run(main)

"""Generate a reinforced dataset (or add a teacher to one): the same program on every host.

    python launch/reinforce.py --config configs/reinforce/coco_mini.py[:variant] \\
        --config.output_dir=DIR [--config.key=value ...]

Multi-host: pass ``--config.run.distributed=True`` on every host (``jax.distributed`` auto-detects
TPU pods and Slurm; elsewhere also ``--config.run.coordinator_address=HOST:PORT
--config.run.num_processes=N --config.run.process_id=I``). Process i makes shards i mod n;
process 0 writes the report and metadata once all are finished. A killed run is resumed by
rerunning the same command: finished shards are skipped.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/reinforce/*.py", lock_config=True)
flags.mark_flag_as_required("config")


def parse_flags(argv):
    """absl parsing, with config-override mistakes (unknown key, wrong type, bad index) reported
    in one line instead of ml_collections' traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"reinforce: error: {e}\nPass --config configs/reinforce/<name>.py[:variant] and "
              f"--config.<key>=<value> overrides.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        print(f"reinforce: error: bad --config override ({type(e).__name__}: {e}); the keys are listed "
              f"in mobileclip2_jax/jobs/reinforce.py and configs/reinforce/common.py", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; everything goes through --config.*")
    cfg = _CONFIG.value
    barrier, index, count = None, 0, 1
    if cfg.run.distributed:
        import jax
        from jax.experimental import multihost_utils
        kwargs = {}
        if cfg.run.coordinator_address:
            kwargs = dict(coordinator_address=cfg.run.coordinator_address,
                          num_processes=cfg.run.num_processes, process_id=cfg.run.process_id)
        jax.distributed.initialize(**kwargs)
        index, count = jax.process_index(), jax.process_count()
        barrier = multihost_utils.sync_global_devices
    from mobileclip2_jax.jobs.reinforce import run
    try:
        run(cfg, process_index=index, process_count=count, barrier=barrier)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as e:
        # configuration and input errors (SchemaError is a ValueError): the message names the
        # config key or file; finished shards stay, so fixing the input and rerunning resumes
        print(f"reinforce: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("reinforce: interrupted; finished shards are kept — rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

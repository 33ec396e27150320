"""launcher: Hydra configs -> DeepSpeed JSON -> `deepspeed` runner, locally or on SLURM.

The folders read as the life of a run:
  cli.py, slurm_job.py    entry points: the CLI and the SLURM job entry (thin)
  prepare.py              compose -> resolve auto -> validate -> preflight -> render: one PreparedRun for both
  config/                 schemas, composition, validation, world shape
  plan/                   memory and step-time planner
  render/                 pure text and dicts: DeepSpeed JSON, launch.sh, sbatch, hostfiles, run-dir files
  launch/                 what starts things: the local runner, SLURM submission, run-dir writes, host facts
  worker/                 what each rank runs (the only place that trains)
  models/                 HF configs and tokenizers, shared by the ranks and the export
  export/                 ZeRO checkpoint -> Hugging Face model dir
A stage imports only the stages before it (launch uses render, render uses config), the entry points and
prepare sit on top, and the ranks' side (worker -> export -> models) borrows launch's small host helpers.
tests/test_layout.py fails on any import cycle between modules or folders, and on torch/deepspeed/
transformers imported anywhere on the launcher side (config, plan, render, launch, prepare, the entries).
"""

from launcher import _moved

__version__ = "0.1.0"
_moved.install()

"""Two-stage training of an expanded model (METHOD.md section 4).

    config.py       `TrainConfig`: every knob of a stage (torch-free)
    losses.py       load balancing, LPR and the routing classifier's loss (Eq. 13)
    setup.py        what trains in a stage, the model and data a stage starts from
    checkpoint.py   atomic resumable checkpoints, frozen-weight checksums
    reporting.py    the JSONL log, trackers and progress of a stage
    loop.py         `train_stage`: one stage, resumable, on any accelerate setup
    distributed.py  devices, processes and trackers through accelerate
    run_stage.py    the process entry of `accelerate launch -m layermoe.training.run_stage`

Nothing is imported here, so that `layermoe.training.config` stays torch-free.
"""

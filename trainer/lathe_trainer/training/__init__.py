"""Building blocks shared by the training stages (PretrainJob, FineTune).

A stage composes them in its own loop. `distributed` sets up the process group from the
`torchrun` environment and `loss` normalizes accumulated losses by token count. `schedule`
builds the learning-rate schedule, `checkpoint` saves and restores the whole training state,
and `metrics` measures throughput and writes the final metrics.
"""

"""The FG-CLIP 2 main job's recipe (`python run/main_job.py --recipe fgclip2`): overrides of the
`fgclip2_tiny` preset for both runs, stage 2's own, and the step counts. The driver, the
evaluation and the report are run/main_job.py's; the scenes are the embedded mixed-size,
mixed-aspect set (data.synthetic.MixedSizes: 8-px patches, budgets 128/256).
"""

STAGE1_STEPS = 80
STAGE2_STEPS = 480
RECIPE = [
    "data.micro_batch_size=16",  # x 2 ranks = 32 per step
    "data.synthetic_num_samples=8192",
    "optim.lr=1e-3",
    "optim.warmup_steps=50",
    "train.log_interval=10",
    "train.eval_batches=0",  # the suite evaluates, on its own held-out split
    "checkpoint.async_save=false",
]
STAGE2_ONLY = ["optim.lr=2e-3"]

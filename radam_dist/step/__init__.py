"""An optimizer step's plan: ``plan.py``'s ``StepPlan`` decides, once per optimizer, where the
state lives, how the gradients are exchanged and which kernel updates each variable group,
and says why (``optimizer.step_plan()``).

The plan sits above the state layouts (radam_dist/distribute/), which it chooses; the
executor that runs its kernels (radam_dist/executor.py) sits below them, so that the
layouts' drivers (which device's copy, which replica's rows) hand their updates to it.
"""

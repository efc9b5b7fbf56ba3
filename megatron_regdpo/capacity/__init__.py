"""The capacity planner: peak memory per GPU of a configured training step, simulated on one CPU
(fake tensors, fake process group), plus the analytic models of what cannot run there."""
